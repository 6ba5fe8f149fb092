"""`python -m mock_accoil`: the same as the `mock-accoil` command."""

from mock_accoil.cli import main

raise SystemExit(main())
