"""`portfwd gateway plan|apply|remove`: the [gateway] ruleset without running portfwd.

The kernel layer plans, applies and removes; this only loads the config and prints what it did,
and exits 1 (after applying) when something outside portfwd's table stops the forwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
    from portfwd.kernel import conntrack, gwfirewall, gwplan, nft
    from portfwd.kernel.describe import plan_notes
    from portfwd.statedir import state_dir

    if action == "remove":
        spec = None
        if config_file is not None:  # named: a config that cannot be read is an error, as anywhere
            spec = planner.load(config.find(config_file)).gateway
        else:  # the table goes anyway; its flows need the config to be told apart
            with contextlib.suppress(ConfigError):
                spec = planner.load(config.find(None)).gateway
        gwfirewall.close()  # the accepts an `apply` with open_other_tables put into other tables
        removed = nft.remove()
        conntrack.unstamp(state_dir())  # a `run` that did not end cleanly turned stamping on
        nft.restore_forwarding(os.path.join(state_dir(), nft.SAVED_FORWARDING))
        if not removed:
            print("table inet portfwd was not loaded")
            return
        if spec is None:
            print("removed table inet portfwd (its flows are left: no [gateway] config to know them by)")
            return
        if shutil.which("conntrack") is None:
            print("removed table inet portfwd")
            print("portfwd: warning: its flows are left: conntrack is not installed", file=sys.stderr)
            return
        try:
            seen: gwplan.Interfaces | None = nft.interfaces(spec)
        except nft.GatewayError:
            seen = None  # an interface is gone: its flows went with it
        networks = seen.lan_networks if seen is not None and spec.masquerade else ()
        via = (*(seen.wan_addresses if seen is not None else ()), *gwplan.virtual_wan(spec, seen))
        cleared = conntrack.forget(conntrack.claims(spec), networks, via)
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
        changes = nft.diff(ruleset, (spec.wan, spec.lan))
        for line in plan_notes(changes, [*nft.forwarding_problems(enable=False), *notes, *blocked]):
            print(line)
        return
    saved = os.path.join(state_dir(), nft.SAVED_FORWARDING)
    for problem in [*nft.forwarding_problems(spec.enable_forwarding, saved=saved), *notes]:
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
