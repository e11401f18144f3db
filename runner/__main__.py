"""`python -m runner` does what the `relay` command does."""

from runner.cli import main

raise SystemExit(main())
