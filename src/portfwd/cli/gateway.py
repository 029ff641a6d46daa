"""`portfwd gateway plan|apply|remove`: the [gateway] ruleset without running portfwd.

The kernel layer plans, applies and removes; this only loads the config and prints what it did,
and exits 1 (after applying) when something outside portfwd's table stops the forwards.
"""

from __future__ import annotations

import contextlib
import sys

import click

from portfwd.cli.options import config_option
from portfwd.errors import ConfigError


@click.command()
@click.argument("action", type=click.Choice(["plan", "apply", "remove"]))
@config_option
def gateway(action: str, config_file: str | None) -> None:
    """nftables gateway forwarding from [gateway]: plan (print and check), apply, or remove."""
    from portfwd import config, planner
    from portfwd.kernel import conntrack, gwfirewall, nft
    from portfwd.kernel.describe import plan_notes
    from portfwd.statedir import state_dir

    if action == "remove":
        spec = None
        with contextlib.suppress(ConfigError):  # the table goes anyway; its flows need the config
            spec = planner.load(config.find(config_file)).gateway
        gwfirewall.close()  # the accepts an `apply` with open_other_tables put into other tables
        removed = nft.remove()
        conntrack.unstamp(state_dir())  # a `run` that did not end cleanly turned stamping on
        if not removed:
            print("table inet portfwd was not loaded")
            return
        if spec is None:
            print("removed table inet portfwd (its flows are left: no [gateway] config to know them by)")
            return
        try:
            networks = nft.interfaces(spec).lan_networks
        except nft.GatewayError:
            networks = ()  # the LAN interface is gone: its masqueraded flows went with it
        cleared = conntrack.forget(conntrack.claims(spec), networks)
        print(f"removed table inet portfwd; cleared {cleared} translated flow(s)")
        return
    path = config.find(config_file)
    spec = planner.load(path).gateway
    if spec is None:
        raise ConfigError(
            f"{path}: no [gateway] section", hint="add [gateway] with wan, lan and [[gateway.forward]]"
        )
    ruleset, notes = nft.prepare(spec)
    if action == "plan":
        print(ruleset, end="")
        nft.apply(ruleset, check_only=True)
        blocked = [gwfirewall.line(item) for item in gwfirewall.findings(spec, nft.ruleset())]
        for line in plan_notes(nft.diff(ruleset), [*nft.forwarding_problems(enable=False), *notes, *blocked]):
            print(line)
        return
    for problem in [*nft.forwarding_problems(spec.enable_forwarding), *notes]:
        print(f"portfwd: warning: {problem}", file=sys.stderr)
    nft.apply(ruleset)
    print(f"applied table inet portfwd: {len(spec.forward)} forward rule(s)")
    found = gwfirewall.findings(spec, nft.ruleset())
    if found and spec.open_other_tables:
        for opened in gwfirewall.open_(found):
            print(f"opened: {opened}")
        found = gwfirewall.findings(spec, nft.ruleset())
    for item in found:
        text = gwfirewall.line(item, spec.open_other_tables)
        print(f"portfwd: {'error' if item.certain else 'warning'}: {text}", file=sys.stderr)
    if any(item.certain for item in found):
        sys.exit(1)  # applied, but it cannot carry anything: not a success
