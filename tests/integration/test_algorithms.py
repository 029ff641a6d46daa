"""portfwd's SSH algorithms against the peers that showed each defect (issue 19, items 4, 5, 7).

- Stock `ssh -o PubkeyAcceptedAlgorithms=ssh-rsa` logged in to `portfwd server` (SHA-1 RSA), and
  an asyncssh client signing with `ssh-rsa` whatever server-sig-algs said still would.
- `ssh-audit` found on `portfwd server` and `portfwd ssh` what it does not find on a stock sshd
  (ed25519 and RSA host keys, default algorithms) and stock ssh, audited in the same test.
- With no known_hosts entry `portfwd ssh` negotiated RSA, so accept-new recorded another key
  than ssh; an RSA-only entry must still verify, also through an ssh_config alias.

ssh-audit 2.5.0's client audit binds 0.0.0.0 and `::`; it runs here with its listening sockets
bound to loopback instead (LOOPBACK_AUDIT). Every process is ours, started and stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncssh
import pytest

from portfwd.sshalgorithms import SAFE, SIGNATURES, available
from tests.conftest import need_binary
from tests.integration.peers import free_port
from tests.integration.processes import READY, Proc, portfwd_argv, run_portfwd, started
from tests.integration.sshd import Sshd, keygen
from tests.integration.test_server import Server

pytestmark = [pytest.mark.integration, pytest.mark.root]

#: `(kex) name [(1024-bit)] -- [fail] why`: one finding of `ssh-audit -b -n`.
FINDING = re.compile(r"^\((\w+)\) (\S+).* -- \[(fail|warn)\] (.*?)\s*$")
#: ssh-audit 2.5.0 does not know these post-quantum hybrids; OpenSSH 9.9+ offers the first.
UNKNOWN_PQ = ("mlkem768x25519-sha256", "sntrup761x25519-sha512")
#: ssh-audit -c, its listening sockets bound to loopback (0.0.0.0 and :: are hard-coded there).
LOOPBACK_AUDIT = (
    "import socket, sys\n"
    "class Loopback(socket.socket):\n"
    "    def bind(self, address):\n"
    "        host = {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(address[0], address[0])\n"
    "        super().bind((host, *address[1:]))\n"
    "socket.socket = Loopback\n"
    "from ssh_audit.ssh_audit import main\n"
    "sys.exit(main())\n"
)
Finding = tuple[str, str, str, str]


def ssh_audit() -> list[str]:
    """The ssh-audit script run by its own interpreter (its package lives in the system Python)."""
    path = need_binary("ssh-audit", "ssh-audit")
    with open(path) as script:
        interpreter = script.readline().removeprefix("#!").split()
    return [*interpreter, path]


def findings(output: str) -> set[Finding]:
    found: set[Finding] = set()
    for line in output.splitlines():
        if match := FINDING.match(line):
            found.add((match[1], match[2], match[3], match[4]))
        elif line.startswith("(cve) "):
            found.add(("cve", line.split()[1], "fail", line))
    return found


def beyond(ours: set[Finding], stock: set[Finding]) -> set[Finding]:
    """Our findings the stock OpenSSH side does not also get (an unknown PQ hybrid is fine)."""
    return {
        item
        for item in ours - stock
        if not (item[3] == "unknown algorithm" and item[1].startswith(UNKNOWN_PQ))
    }


def audit_server(port: int, *flags: str) -> str:
    result = subprocess.run(
        [*ssh_audit(), *flags, "-p", str(port), "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode in (0, 2, 3), result.stdout + result.stderr  # 1: could not connect
    return result.stdout


def offered(report: dict[str, list[dict[str, str]]], kind: str) -> list[str]:
    """An `ssh-audit -j` list without the pseudo-algorithms (ext-info, strict kex)."""
    names = [entry["algorithm"] if isinstance(entry, dict) else entry for entry in report[kind]]
    return [name for name in names if not name.startswith(("ext-info-", "kex-strict-"))]


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port? Read from /proc: connecting would be audited."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return any(f[1] == local and f[3] == "0A" for f in (line.split() for line in list(table)[1:]))


def audit_client(client: Callable[[int], list[str]], *flags: str) -> str:
    """Run `ssh-audit -c` on a loopback port, point `client(port)` at it, return the report."""
    port = free_port()
    interpreter = ssh_audit()[:-1]
    audit = Proc([*interpreter, "-c", LOOPBACK_AUDIT, "-c", "-n", "-t", "30", *flags, "-p", str(port)])
    try:
        deadline = time.monotonic() + 15
        while not listening(port):
            assert audit.popen.poll() is None, audit.output()
            assert time.monotonic() < deadline, "ssh-audit -c never listened"
            time.sleep(0.02)
        with started(client(port)) as peer:
            code = audit.popen.wait(30)
            assert code in (0, 2, 3), f"{audit.output()}\n--- client:\n{peer.output()}"
        return audit.output()
    finally:
        audit.stop()
        audit.close()


def stock_ssh(port: int, *options: str, destination: str = "x@127.0.0.1") -> list[str]:
    return ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", *options, "-p", str(port), destination, "true"]


def portfwd_ssh(root: Path, port: int | None, *args: str, destination: str = "root@127.0.0.1") -> list[str]:
    """`portfwd ssh` with one -L (portfwd ssh only forwards), its own control socket."""
    where = [] if port is None else ["-p", str(port)]
    return portfwd_argv(
        "ssh", "--control", str(root / f"ctl-{free_port()}.sock"), *args, *where,
        "-L", f"127.0.0.1:{free_port()}:127.0.0.1:9", destination,
    )  # fmt: skip


# ---------------------------------------------------------------------------- portfwd server
def server_with(tmp_path: Path, lines: str = "", rsa_host_key: bool = False) -> Server:
    """A portfwd server with `lines` added to its [server] table (not started)."""
    server = Server(tmp_path)
    server.config.write_text(
        server.config.read_text().replace("[[server.user]]", lines + "[[server.user]]", 1)
    )
    if rsa_host_key:  # portfwd makes an ed25519 key when there is none; this one it reads
        keygen(server.host_key, "rsa")
    return server


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    """Start `server` and always stop it, also when it never got ready."""
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """portfwd server whose user alice also has an RSA key (tmp_path/alice_rsa)."""
    unstarted = Server(tmp_path)
    with (tmp_path / "alice.keys").open("a") as keys:
        keys.write(keygen(tmp_path / "alice_rsa", "rsa") + "\n")
    with running(unstarted) as started_server:
        yield started_server


def test_stock_ssh_with_sha1_rsa_is_refused_and_sha2_logs_in(server: Server) -> None:
    rsa = server.root / "alice_rsa"
    refused = subprocess.run(
        server.ssh("-v", "-o", "PubkeyAcceptedAlgorithms=ssh-rsa", key=rsa),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert refused.returncode == 255, refused.stderr
    assert "Permission denied (publickey)" in refused.stderr
    assert "remote software version portfwd\n" in refused.stderr
    [advertised] = re.findall(r"server-sig-algs=<([^>]*)>", refused.stderr)
    assert advertised.split(",") == list(SIGNATURES), "SHA-2 and non-RSA only, each once"
    with started(server.ssh("-v", "-o", "PubkeyAcceptedAlgorithms=rsa-sha2-512", key=rsa)) as client:
        client.wait_for("Authenticated to 127.0.0.1")
    assert "logged in with key" in server.log()


@pytest.mark.parametrize(("signature", "accepted"), [("ssh-rsa", False), ("rsa-sha2-512", True)])
async def test_a_client_signing_with_ssh_rsa_anyway_is_refused(
    server: Server, signature: str, accepted: bool
) -> None:
    """asyncssh signs with the algorithm it is told to, even one server-sig-algs leaves out."""
    (pair,) = asyncssh.load_keypairs([asyncssh.read_private_key(str(server.root / "alice_rsa"))])
    pair.set_sig_algorithm(signature.encode())
    options = {"client_keys": [pair], "signature_algs": [signature], "agent_path": None, "config": None}
    try:
        async with asyncssh.connect(
            "127.0.0.1", server.port, username="alice", known_hosts=str(server.known_hosts), **options
        ):
            logged_in = True
    except asyncssh.PermissionDenied:
        logged_in = False
    assert logged_in is accepted


def test_ssh_audit_finds_nothing_on_portfwd_server_that_sshd_lacks(tmp_path: Path) -> None:
    with default_sshd(tmp_path / "sshd") as stock, running(Server(tmp_path)) as ours:
        with socket.create_connection(("127.0.0.1", ours.port), timeout=10) as client:
            assert client.makefile("rb").readline() == b"SSH-2.0-portfwd\r\n"
        sshd_report, our_report = audit_server(stock.port, "-b", "-n"), audit_server(ours.port, "-b", "-n")
    assert "(gen) banner: SSH-2.0-OpenSSH" in sshd_report
    assert findings(sshd_report), "the comparison means something only if sshd has findings"
    assert beyond(findings(our_report), findings(sshd_report)) == set(), our_report


def test_an_rsa_host_key_is_offered_with_sha2_only(tmp_path: Path) -> None:
    with running(server_with(tmp_path, rsa_host_key=True)) as ours:
        report = json.loads(audit_server(ours.port, "-j"))
        refused = subprocess.run(
            ours.ssh("-o", "HostKeyAlgorithms=ssh-rsa"),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert sorted(offered(report, "key")) == ["rsa-sha2-256", "rsa-sha2-512"]
    assert "no matching host key type found" in refused.stderr


def test_narrowed_sets_are_all_the_server_offers(tmp_path: Path) -> None:
    lines = (
        'kex = ["curve25519-sha256"]\nciphers = ["aes256-gcm@openssh.com"]\n'
        'macs = ["hmac-sha2-512-etm@openssh.com"]\nhost_key_algorithms = ["rsa-sha2-512"]\n'
    )
    with running(server_with(tmp_path, lines, rsa_host_key=True)) as ours:
        report = json.loads(audit_server(ours.port, "-j"))
        outside = subprocess.run(
            ours.ssh("-o", "KexAlgorithms=ecdh-sha2-nistp256"),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        with started(ours.ssh("-v", "-o", "KexAlgorithms=curve25519-sha256")) as inside:
            inside.wait_for("Authenticated to 127.0.0.1")
    assert offered(report, "kex") == ["curve25519-sha256"]
    assert offered(report, "enc") == ["aes256-gcm@openssh.com"]
    assert offered(report, "mac") == ["hmac-sha2-512-etm@openssh.com"]
    assert offered(report, "key") == ["rsa-sha2-512"]
    assert "no matching key exchange method found" in outside.stderr


def test_check_refuses_a_sha1_kex_in_one_line(tmp_path: Path) -> None:
    ours = server_with(tmp_path, 'kex = ["diffie-hellman-group14-sha1"]\n')
    result = run_portfwd("check", "-c", str(ours.config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "portfwd: server.kex: key exchange algorithm 'diffie-hellman-group14-sha1' is not allowed (portfwd "
        f"offers OpenSSH's defaults or stricter); use one or more of: {', '.join(available('kex'))}"
    ]


# ---------------------------------------------------------------------------- portfwd ssh
def test_ssh_audit_finds_nothing_on_portfwd_ssh_that_ssh_lacks(tmp_path: Path) -> None:
    need_binary("ssh", "openssh-client")
    options = (
        "-o",
        f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
        "-o",
        "StrictHostKeyChecking=accept-new",
    )
    stock = audit_client(lambda port: stock_ssh(port, *options), "-b")
    ours = audit_client(lambda port: portfwd_ssh(tmp_path, port, "-F", "/dev/null", *options), "-b")
    assert "(gen) banner: SSH-2.0-OpenSSH" in stock
    assert "(gen) banner: SSH-2.0-portfwd" in ours
    assert findings(stock), "the comparison means something only if ssh has findings"
    assert beyond(findings(ours), findings(stock)) == set(), ours


def test_portfwd_ssh_offers_only_what_its_options_narrow(tmp_path: Path) -> None:
    args = (
        "-F", "/dev/null", "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
        "-o", "KexAlgorithms=curve25519-sha256,diffie-hellman-group14-sha256", "-o", "Ciphers=aes128-ctr",
        "-o", "MACs=hmac-sha2-256-etm@openssh.com", "-o", "HostKeyAlgorithms=ssh-ed25519,rsa-sha2-512",
    )  # fmt: skip
    report = json.loads(audit_client(lambda port: portfwd_ssh(tmp_path, port, *args), "-j"))
    assert offered(report, "kex") == ["curve25519-sha256", "diffie-hellman-group14-sha256"]
    assert offered(report, "enc") == ["aes128-ctr"]
    assert offered(report, "mac") == ["hmac-sha2-256-etm@openssh.com"]
    assert offered(report, "key") == ["ssh-ed25519", "rsa-sha2-512"]


@contextlib.contextmanager
def default_sshd(root: Path) -> Iterator[Sshd]:
    """A stock sshd with default algorithms and, like a Debian install, ed25519 and RSA host keys."""
    root.mkdir()
    keygen(root / "host_rsa", "rsa")
    server = Sshd(root, (f"HostKey {root / 'host_rsa'}", "LogLevel DEBUG1"))
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with default_sshd(tmp_path_factory.mktemp("algorithms") / "sshd") as server:
        yield server


def recorded(path: Path) -> list[str]:
    return [" ".join(line.split()[:3]) for line in path.read_text().splitlines()]


def test_accept_new_records_the_key_stock_ssh_records(sshd: Sshd, tmp_path: Path) -> None:
    """With nothing known, both offer ed25519 first: the key kept is the one ssh would keep."""
    theirs, ours = tmp_path / "ssh_known_hosts", tmp_path / "portfwd_known_hosts"
    login = ("-i", str(sshd.user_key), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=accept-new")
    result = subprocess.run(
        stock_ssh(sshd.port, *login, "-o", f"UserKnownHostsFile={theirs}", destination="root@127.0.0.1"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    argv = portfwd_ssh(tmp_path, sshd.port, "-F", "/dev/null", *login, "-o", f"UserKnownHostsFile={ours}")
    with started(argv, ready=READY) as client:
        client.wait_for("connected to")
    assert (
        recorded(ours)
        == recorded(theirs)
        == [f"[127.0.0.1]:{sshd.port} {sshd.host_public.rsplit(' ', 1)[0]}"]
    )


@pytest.mark.parametrize("via_alias", [False, True], ids=["direct", "ssh-config-alias"])
def test_an_rsa_only_known_hosts_entry_still_verifies(sshd: Sshd, tmp_path: Path, via_alias: bool) -> None:
    """The known key type goes first (OpenSSH's order_hostkeyalgs), looked up under ssh_config's Hostname."""
    rsa_public = (sshd.root / "host_rsa.pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {rsa_public[0]} {rsa_public[1]}\n")
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(f"Host tunnel-alias\n  Hostname 127.0.0.1\n  Port {sshd.port}\n")
    login = ["-i", str(sshd.user_key), "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}"]
    if via_alias:
        argv = portfwd_ssh(tmp_path, None, "-F", str(ssh_config), *login, destination="root@tunnel-alias")
    else:
        argv = portfwd_ssh(tmp_path, sshd.port, "-F", "/dev/null", *login)
    assert sshd.proc is not None
    mark = sshd.proc.mark()
    with started(argv, ready=READY) as client:
        client.wait_for("connected to")
    assert "kex: host key algorithm: rsa-sha2-512" in sshd.proc.wait_for(
        "kex: host key algorithm:", start=mark
    )
    assert known.read_text().count("\n") == 1, "nothing was added"


def test_the_sets_are_openssh_defaults_or_stricter() -> None:
    """Each set is within OpenSSH's defaults on this machine (ssh -G, sshd -T); mlkem is 9.9+'s."""
    client = subprocess.run(["ssh", "-G", "-F", "/dev/null", "x"], capture_output=True, text=True, timeout=30)
    server = subprocess.run(
        ["/usr/sbin/sshd", "-T", "-f", "/dev/null"], capture_output=True, text=True, timeout=30
    )
    assert client.returncode == server.returncode == 0, client.stderr + server.stderr
    for output in (client.stdout, server.stdout):
        defaults = dict(line.split(" ", 1) for line in output.splitlines() if " " in line)
        for key, ours in (
            ("kexalgorithms", SAFE["kex"]),
            ("ciphers", SAFE["ciphers"]),
            ("macs", SAFE["macs"]),
            ("hostkeyalgorithms", SAFE["host_key_algorithms"]),
            ("pubkeyacceptedalgorithms", SIGNATURES),
        ):
            extra = set(ours) - set(defaults[key].split(",")) - {"mlkem768x25519-sha256"}
            assert extra <= {"webauthn-sk-ecdsa-sha2-nistp256@openssh.com"}, (key, extra)
