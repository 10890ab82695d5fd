"""Side-by-side benchmarks of mptcpd-py and the C mptcpd (``python -m bench``;
see bench/README.md)."""
