"""The policies shipped with mptcpd-py.

They are loaded through the ``mptcpd_py.plugins`` entry point, exactly like
a plugin a user installs as a package; each module's docstring is its user
documentation.
"""
