"""Gateway high availability as text: keepalived's and conntrackd's configuration and the
notify script that joins them. Pure: no process, no file, no socket.

Two routers share virtual WAN and LAN addresses. keepalived (VRRP) decides which one holds them
and conntrackd copies the NAT state between them, so that a flow keeps going when the other
router takes over. These are the routers' own engines, used as a router vendor would use them;
portfwd only writes what they read (kernel/hasupervisor.py runs them).

Theory of operation:
- One VRRP instance speaks on the sync link, unicast to `peer`, and tracks the WAN and LAN
  links: a router whose WAN or LAN link goes down turns FAULT, gives its virtual addresses up
  (keepalived announces priority 0, so the peer takes over at once rather than after three
  missed adverts) and the peer becomes MASTER.
- Both routers start as BACKUP with `nopreempt`: the higher priority wins when both start, but a
  router coming back does not take the addresses back. A failback is a second interruption
  that buys nothing, and the returning router's copy of the NAT state may not be complete yet.
  (Cisco's HSRP does not preempt by default, for the same reason.)
- The sync link is not tracked (`dont_track_primary`): on a direct cable both ends lose the
  carrier together, and tracking it would turn both routers FAULT, an outage. Losing it makes
  both MASTER instead (each forwards what reaches it) until it is back.
- The notify script does what conntrack-tools' own primary-backup.sh does on each transition:
  MASTER commits the peer's state into the kernel (`-c`), flushes both caches (`-f`),
  resyncs its cache with the kernel (`-R`) and sends it all to the peer (`-B`); BACKUP shortens
  the kernel's timers of stale entries (`-t`) and asks the master for its state (`-n`); FAULT
  only shortens the timers. keepalived runs notify scripts concurrently, so the script takes a
  lock: transitions apply one at a time.
- conntrackd syncs with FTFW (reliable, acknowledged) over UDP on the sync link. Only forwarded
  flows matter: the router's own addresses, the virtual addresses and loopback are ignored,
  and TCP is synced once established, so a SYN flood does not flood the sync link.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass
from pathlib import Path

from portfwd.kernel.nft import GatewayError
from portfwd.specs import GatewayHASpec, GatewaySpec

#: conntrackd's sync port (its documented default), on the sync link only.
SYNC_PORT = 3780
#: VRRPv3 counts adverts in centiseconds, up to 12 bits (RFC 5798 5.2.7).
ADVERT_MIN, ADVERT_MAX = 0.01, 40.95
#: What role() reports before keepalived has named a state.
ROLES = ("master", "backup", "fault", "starting")
INSTANCE = "portfwd"


@dataclass(frozen=True, slots=True)
class HAPaths:
    """Every file the HA engines read or write, all in one directory owned by this portfwd.

    Nothing goes to /run, /var/lock or /etc, so two routers (or two tests) on one machine do
    not collide, and removing the directory removes everything. The pid files also let a new
    supervisor find engines a killed portfwd left running (kernel/hasupervisor.py).
    """

    directory: Path
    keepalived_conf: Path
    keepalived_pid: Path
    vrrp_pid: Path
    checkers_pid: Path
    conntrackd_conf: Path
    conntrackd_pid: Path
    conntrackd_socket: Path
    conntrackd_lock: Path
    conntrackd_log: Path
    notify_script: Path
    notify_lock: Path
    notify_log: Path
    state_file: Path
    supervisor_lock: Path

    @classmethod
    def under(cls, directory: str | Path) -> HAPaths:
        """The paths inside `directory`. Raises GatewayError for a path the configs cannot quote."""
        base = Path(directory).absolute()
        if any(ch.isspace() or ch in "\"'\\{}#!;" for ch in str(base)):
            raise GatewayError(f"gateway.ha: {str(base)!r} has characters keepalived cannot quote")
        return cls(
            directory=base,
            keepalived_conf=base / "keepalived.conf",
            keepalived_pid=base / "keepalived.pid",
            vrrp_pid=base / "vrrp.pid",
            checkers_pid=base / "checkers.pid",
            conntrackd_conf=base / "conntrackd.conf",
            # conntrackd writes no pid file: the supervisor records the one it started
            conntrackd_pid=base / "conntrackd.pid",
            conntrackd_socket=base / "conntrackd.ctl",
            conntrackd_lock=base / "conntrackd.lock",
            conntrackd_log=base / "conntrackd.log",
            notify_script=base / "notify.sh",
            notify_lock=base / "notify.lock",
            notify_log=base / "notify.log",
            state_file=base / "state",
            # held (flock) by the supervisor using the directory, so a second one cannot take over
            supervisor_lock=base / "supervisor.lock",
        )


@dataclass(frozen=True, slots=True)
class HAHost:
    """What this router looks like, found by the caller (`ip -j addr` in its namespace).

    `sync_address` is this router's address on the sync link (VRRP's and conntrackd's source);
    `wan` and `lan` are the addresses on those links, whose networks decide where each virtual
    address goes.
    """

    sync_address: ipaddress.IPv4Interface
    wan: tuple[ipaddress.IPv4Interface, ...]
    lan: tuple[ipaddress.IPv4Interface, ...]


def _ha(gateway: GatewaySpec) -> GatewayHASpec:
    if gateway.ha is None:
        raise GatewayError("gateway.ha: not configured")
    return gateway.ha


def placement(gateway: GatewaySpec, host: HAHost) -> tuple[tuple[ipaddress.IPv4Interface, str], ...]:
    """Each virtual address with the interface it goes on: the WAN or LAN link whose network
    (from the link's own addresses) contains it. Raises GatewayError for an address on neither,
    on both, or equal to one of the router's own (keepalived would delete it on stop).
    """
    ha = _ha(gateway)
    placed = []
    own = {addr.ip for addr in (*host.wan, *host.lan, host.sync_address)}
    for index, vip in enumerate(ha.virtual_addresses):
        field = f"gateway.ha.virtual_addresses[{index}]"
        if vip.ip in own:
            raise GatewayError(
                f"{field}: {vip.ip} is this router's own address; a virtual address must be a"
                " third one that moves between the routers"
            )
        links = [
            dev
            for dev, addrs in ((gateway.wan, host.wan), (gateway.lan, host.lan))
            if any(vip.ip in addr.network for addr in addrs)
        ]
        if len(links) != 1:
            nets = ", ".join(
                f"{dev} {' '.join(str(a.network) for a in addrs) or '(no address)'}"
                for dev, addrs in ((gateway.wan, host.wan), (gateway.lan, host.lan))
            )
            where = "both" if links else "neither"
            raise GatewayError(
                f"{field}: {vip} is in {where} of the WAN and LAN networks ({nets});"
                " give each router an address in the network of each virtual address"
            )
        placed.append((vip, links[0]))
    return tuple(placed)


def check(gateway: GatewaySpec, host: HAHost) -> None:
    """Refuse combinations keepalived or conntrackd would reject or run badly. Raises GatewayError."""
    ha = _ha(gateway)
    peer = ipaddress.IPv4Address(ha.peer)
    if ha.sync_interface == gateway.wan:
        raise GatewayError(
            f"gateway.ha.sync_interface: {ha.sync_interface} is the WAN; the NAT state must not"
            " travel on the public side, use a link of its own (or the LAN)"
        )
    if peer == host.sync_address.ip:
        raise GatewayError(
            f"gateway.ha.peer: {peer} is this router's own address on {ha.sync_interface};"
            " write the other router's"
        )
    if peer not in host.sync_address.network:
        raise GatewayError(
            f"gateway.ha.peer: {peer} is not on {ha.sync_interface} ({host.sync_address.network});"
            " the routers must share the sync link"
        )
    if not ADVERT_MIN <= ha.advert_interval <= ADVERT_MAX:
        raise GatewayError(
            f"gateway.ha.advert_interval: {ha.advert_interval:g}s is out of VRRPv3's range"
            f" ({ADVERT_MIN:g}-{ADVERT_MAX:g}s)"
        )
    if abs(round(ha.advert_interval * 100) - ha.advert_interval * 100) > 1e-6:
        raise GatewayError(
            f"gateway.ha.advert_interval: {ha.advert_interval:g}s is finer than VRRPv3's"
            " centiseconds; round it to 0.01s"
        )
    placement(gateway, host)


def _advert(seconds: float) -> str:
    text = f"{seconds:.2f}".rstrip("0").rstrip(".")
    return text or "0"


def keepalived_conf(gateway: GatewaySpec, paths: HAPaths, host: HAHost) -> str:
    """keepalived.conf for this router. Raises GatewayError (see check())."""
    check(gateway, host)
    ha = _ha(gateway)
    vips = "\n".join(f"        {vip} dev {dev}" for vip, dev in placement(gateway, host))
    return f"""\
# Written by portfwd for [gateway.ha]; rewritten at every start and reload.
global_defs {{
    router_id portfwd-{ha.router_id}-{host.sync_address.ip}
    # the notify script is root's, in a directory only root can write
    script_user root
    enable_script_security
    vrrp_version 3
}}

vrrp_instance {INSTANCE} {{
    # both start as BACKUP: the higher priority wins at start, nobody takes over later
    state BACKUP
    nopreempt
    interface {ha.sync_interface}
    dont_track_primary
    virtual_router_id {ha.router_id}
    priority {ha.priority}
    advert_int {_advert(ha.advert_interval)}
    unicast_src_ip {host.sync_address.ip}
    unicast_peer {{
        {ha.peer}
    }}
    track_interface {{
        {gateway.wan}
        {gateway.lan}
    }}
    virtual_ipaddress {{
{vips}
    }}
    notify "{paths.notify_script}"
}}
"""


def conntrackd_conf(gateway: GatewaySpec, paths: HAPaths, host: HAHost) -> str:
    """conntrackd.conf for this router: FTFW over UDP to the peer. Raises GatewayError."""
    check(gateway, host)
    ha = _ha(gateway)
    ignored = sorted(
        {
            ipaddress.IPv4Address("127.0.0.1"),
            host.sync_address.ip,
            *(addr.ip for addr in (*host.wan, *host.lan)),
            *(vip.ip for vip in ha.virtual_addresses),
        }
    )
    ignore = "\n".join(f"            IPv4_address {addr}" for addr in ignored)
    return f"""\
# Written by portfwd for [gateway.ha]; rewritten at every start and reload.
Sync {{
    Mode FTFW {{
        # the peer's state stays in conntrackd's cache until this router becomes MASTER
        DisableExternalCache off
        # a router that (re)starts asks the running one for its state at once
        StartupResync on
    }}
    UDP {{
        IPv4_address {host.sync_address.ip}
        IPv4_Destination_Address {ha.peer}
        Port {SYNC_PORT}
        Interface {ha.sync_interface}
        SndSocketBuffer 1249280
        RcvSocketBuffer 1249280
        Checksum on
    }}
}}

General {{
    Systemd off
    HashSize 32768
    HashLimit 131072
    Syslog off
    LogFile {paths.conntrackd_log}
    LockFile {paths.conntrackd_lock}
    UNIX {{
        Path {paths.conntrackd_socket}
    }}
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 8388608
    # only forwarded flows: not the router's own traffic, not half-open TCP. In userspace:
    # kernel-space (BSF) filtering delivered no events at all on kernel 6.18 with conntrackd 1.4.7
    Filter From Userspace {{
        Protocol Accept {{
            TCP
            UDP
            ICMP
        }}
        Address Ignore {{
{ignore}
        }}
        State Accept {{
            ESTABLISHED CLOSED TIME_WAIT CLOSE_WAIT for TCP
        }}
    }}
}}
"""


def notify_script(paths: HAPaths, conntrackd: str = "/usr/sbin/conntrackd") -> str:
    """The script keepalived runs on each transition (`notify.sh INSTANCE name STATE priority`):
    records the state for role() and hands the NAT state over as primary-backup.sh does."""
    q = shlex.quote
    state, tmp = q(str(paths.state_file)), q(f"{paths.state_file}.tmp")
    return f"""\
#!/bin/sh
# Written by portfwd for [gateway.ha]. keepalived runs it as: notify.sh TYPE NAME STATE PRIORITY
exec >>{q(str(paths.notify_log))} 2>&1
exec 9>{q(str(paths.notify_lock))}
# keepalived does not wait for one notify before the next: apply transitions one at a time
flock 9
echo "$(date '+%F %T') $2 -> $3"
ct() {{
    {q(conntrackd)} -C {q(str(paths.conntrackd_conf))} "$@" || echo "conntrackd $* failed ($?)"
}}
case "$3" in
    MASTER)
        ct -c   # commit the peer's flows into the kernel
        ct -f   # flush the internal and external caches
        ct -R   # resync the internal cache with the kernel
        ct -B   # send everything to the peer
        ;;
    BACKUP)
        ct -t   # shorten the timers of flows the master now owns
        ct -n   # ask the master for its state
        ;;
    FAULT)
        ct -t
        ;;
esac
state=$(printf '%s' "$3" | tr 'A-Z' 'a-z')
# recorded last: "master" means the peer's flows are committed
printf '%s\\n' "$state" >{tmp} && mv -f {tmp} {state}
"""


def parse_role(text: str) -> str:
    """The role recorded in the state file: master, backup, fault, or starting (none yet)."""
    word = text.strip().lower()
    return word if word in ROLES else "starting"
