"""Kernel forwarding on a Linux gateway: nftables rulesets planned from the config, applied whole."""
