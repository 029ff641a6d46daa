"""ssh/keys.py: key files read once, checked as OpenSSH checks them, passphrases asked at most 3 times."""

from __future__ import annotations

import importlib.util
import subprocess
from dataclasses import replace
from pathlib import Path

import asyncssh
import pytest

from portfwd.specs import TunnelSpec
from portfwd.ssh.connection import _options
from portfwd.ssh.hostkeys import HostKeyCheck
from portfwd.ssh.keys import KeyFileError, KeyLoginError, identities, load, public_half
from tests.conftest import need_binary

PASSPHRASE = "s3cret"


def write_key(path: Path, passphrase: str | None = None, mode: int = 0o600) -> asyncssh.SSHKey:
    """A key file; with a passphrase in PKCS#8 (PBES2), which asyncssh decrypts without bcrypt."""
    key = asyncssh.generate_private_key("ecdsa-sha2-nistp256" if passphrase else "ssh-ed25519")
    exported = key.export_private_key("pkcs8-pem", passphrase) if passphrase else key.export_private_key()
    path.write_bytes(exported)
    path.chmod(mode)
    path.with_name(path.name + ".pub").write_bytes(key.export_public_key())
    return key


def test_a_plain_key_loads_without_asking(tmp_path: Path) -> None:
    key = write_key(tmp_path / "id")
    asked: list[str] = []
    pairs = load((str(tmp_path / "id"),), field="-i", ask=asked.append)  # type: ignore[arg-type]
    assert [pair.public_data for pair in pairs] == [key.public_data]
    assert asked == []


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as caught:
        load((str(tmp_path / "nope"),), field="-i")
    assert caught.value.line() == f"-i: {tmp_path / 'nope'}: no such key file; give an existing private key"
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_key_group_or_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    write_key(tmp_path / "id", mode=mode)
    with pytest.raises(KeyFileError) as caught:
        load((str(tmp_path / "id"),), field="tunnel[0].identity")
    assert caught.value.line() == (
        f"tunnel[0].identity: UNPROTECTED PRIVATE KEY FILE {tmp_path / 'id'}: permissions {mode:04o} are too "
        f"open (a private key must not be readable by group or others); chmod 600 {tmp_path / 'id'}"
    )


def test_not_a_key(tmp_path: Path) -> None:
    (tmp_path / "id").write_text("hello\n")
    (tmp_path / "id").chmod(0o600)
    with pytest.raises(KeyFileError) as caught:
        load((str(tmp_path / "id"),), field="-i")
    assert caught.value.line().startswith(f"-i: {tmp_path / 'id'}: not a private key (")


def test_a_passphrase_is_asked_until_right_up_to_three_times(tmp_path: Path) -> None:
    key = write_key(tmp_path / "id", PASSPHRASE)
    answers = iter(["wrong", PASSPHRASE])
    prompts: list[str] = []

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        return next(answers)

    pairs = load((str(tmp_path / "id"),), field="-i", agent=False, ask=ask)
    assert [pair.public_data for pair in pairs] == [key.public_data]
    assert prompts == [f"Enter passphrase for key '{tmp_path / 'id'}': "] * 2
    with pytest.raises(KeyLoginError) as caught:
        load((str(tmp_path / "id"),), field="-i", agent=False, ask=lambda prompt: "wrong")
    assert caught.value.line() == f"-i: {tmp_path / 'id'}: wrong passphrase (3 tries)"
    assert caught.value.exit_code == 1


def test_a_locked_key_in_batch_mode_or_with_nobody_to_ask(tmp_path: Path) -> None:
    write_key(tmp_path / "id", PASSPHRASE)
    path = tmp_path / "id"
    hint = f"add it to the agent first (ssh-add {path}) or run portfwd ssh on a terminal"
    with pytest.raises(KeyLoginError) as batch:
        load((str(path),), field="-i", agent=False, batch=True, ask=lambda prompt: PASSPHRASE)
    assert (
        batch.value.line()
        == f"-i: {path}: the key needs a passphrase and BatchMode=yes forbids asking; {hint}"
    )
    with pytest.raises(KeyLoginError) as nobody:
        load((str(path),), field="-i", agent=False, ask=lambda prompt: None)
    assert (
        nobody.value.line()
        == f"-i: {path}: the key needs a passphrase and there is no terminal to ask on; {hint}"
    )


def test_unattended_a_locked_key_is_left_to_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_key(tmp_path / "locked", PASSPHRASE)
    plain = write_key(tmp_path / "plain")
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent.sock"))
    pairs = load((str(tmp_path / "locked"), str(tmp_path / "plain")), field="identity")
    assert [pair.public_data for pair in pairs] == [plain.public_data]


def _openssh_format_locked_key(path: Path) -> None:
    """ssh-keygen's default: the OpenSSH private key format, its passphrase through bcrypt's KDF."""
    need_binary("ssh-keygen", "openssh-client")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", PASSPHRASE, "-f", str(path)], check=True, timeout=30
    )


def test_an_openssh_format_locked_key_unlocks_with_its_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "id"
    _openssh_format_locked_key(path)
    pairs = load((str(path),), field="-i", agent=False, ask=lambda prompt: PASSPHRASE)
    public = asyncssh.read_public_key(str(path) + ".pub")
    assert [pair.public_data for pair in pairs] == [public.public_data]


def test_an_openssh_format_locked_key_without_bcrypt_is_named_before_asking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "id"
    _openssh_format_locked_key(path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *rest: None if name == "bcrypt" else find_spec(name, *rest)
    )
    asked: list[str] = []
    with pytest.raises(KeyLoginError) as caught:
        load((str(path),), field="-i", agent=False, ask=lambda prompt: asked.append(prompt) or "x")
    assert caught.value.line() == (
        f"-i: {path}: a passphrase-protected key in OpenSSH format needs Python's bcrypt module, which is "
        f"not installed; install it (pip install bcrypt), or add the key to the agent first (ssh-add {path})"
    )
    assert asked == []


def test_identities_only_offers_the_public_halves_it_can_read(tmp_path: Path) -> None:
    """IdentitiesOnly=yes: each -i key's .pub, else its unencrypted private key; a locked key
    without a .pub is skipped (as ssh); none readable at all offers no agent key, not every one."""
    plain = write_key(tmp_path / "plain")
    (tmp_path / "plain.pub").unlink()
    locked = write_key(tmp_path / "locked", PASSPHRASE)
    write_key(tmp_path / "hidden", PASSPHRASE)
    (tmp_path / "hidden.pub").unlink()
    found = identities((str(tmp_path / "plain"), str(tmp_path / "locked"), str(tmp_path / "hidden")))
    assert found == [plain.public_data, locked.public_data]
    assert identities((str(tmp_path / "hidden"),)) == [b"none"]


def test_an_openssh_format_locked_key_without_its_pub_still_names_its_public_half(tmp_path: Path) -> None:
    """ssh reads the public key a locked OpenSSH-format file keeps in the clear (no .pub needed);
    a certificate beside a key is offered too."""
    need_binary("ssh-keygen", "openssh-client")
    path = tmp_path / "locked"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", PASSPHRASE, "-f", str(path)], check=True, timeout=30
    )
    public = asyncssh.read_public_key(f"{path}.pub").public_data
    (tmp_path / "locked.pub").unlink()
    assert public_half(str(path)) == public
    assert identities((str(path),)) == [public]
    ca = asyncssh.generate_private_key("ssh-ed25519")
    cert = ca.generate_user_certificate(
        asyncssh.public_key.decode_ssh_public_key(public), "locked", principals=["root"]
    )
    cert.write_certificate(f"{path}-cert.pub")
    assert identities((str(path),)) == [public, cert.public_data]


def test_keys_left_to_the_agent_never_bring_the_default_key_files_along(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every -i key locked and left to the agent: asyncssh must not fall back to ~/.ssh/id_*
    (ssh offers no default file once keys are named), and the agent stays on. IdentitiesOnly
    from ssh_config restricts the agent to the named keys' public halves."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    write_key(home / ".ssh" / "id_ed25519")  # a default key that must not be offered
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent.sock"))  # an agent is said to be there
    locked = write_key(tmp_path / "locked", PASSPHRASE)
    config = tmp_path / "ssh_config"
    config.write_text("Host lab\n  IdentitiesOnly yes\n")
    spec = TunnelSpec(
        label="lab", ssh="lab", user="root", host="lab", port=22,
        identity=(str(tmp_path / "locked"),), ssh_config=(str(config),),
    )  # fmt: skip
    options = _options(spec, HostKeyCheck([], False), "lab", 22, "root", lambda _: None)
    assert options["agent_identities"] == [locked.public_data]
    prepared = asyncssh.SSHClientConnectionOptions(
        host="lab",
        known_hosts=None,
        config=[str(config)],
        client_keys=options["client_keys"],
        ignore_encrypted=options["ignore_encrypted"],
        agent_identities=options["agent_identities"],
    )
    assert prepared.client_keys == []  # no key file of its own: the agent signs
    assert prepared.agent_path == str(tmp_path / "agent.sock")
    elsewhere = _options(
        replace(spec, host="other"), HostKeyCheck([], False), "other", 22, "root", lambda _: None
    )
    assert elsewhere["agent_identities"] is None  # no IdentitiesOnly for that host: every agent key


def test_a_public_key_file_is_left_to_the_agent_or_refused_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`-i KEY.pub` (a hardware key's or a password manager's agent holds the private half):
    world-readable as public keys are, never loaded as a private key; with no agent, one line."""
    key = write_key(tmp_path / "id")
    public = tmp_path / "id.pub"
    public.chmod(0o644)
    monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent.sock"))
    assert load((str(public),), field="-i") == ()
    assert identities((str(public),)) == [key.public_data]
    monkeypatch.delenv("SSH_AUTH_SOCK")
    with pytest.raises(KeyFileError) as caught:
        load((str(public),), field="-i")
    assert caught.value.line() == (
        f"-i: {public}: a public key, and no ssh-agent to sign with its private half; "
        "add the key to the agent (SSH_AUTH_SOCK) or give the private key file"
    )
