"""mptcpd-py: a Multipath TCP path-manager daemon."""

__version__ = "0.1.0"
