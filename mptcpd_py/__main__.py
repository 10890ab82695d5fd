from mptcpd_py.cli import main

raise SystemExit(main())
