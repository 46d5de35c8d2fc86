"""`python -m chefia_rt` is the `chefia-rt` command."""

from chefia_rt.cli import main

raise SystemExit(main())
