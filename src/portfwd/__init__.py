"""portfwd: every kind of port forwarding from one command line and one config file."""

__version__ = "0.1.0"
