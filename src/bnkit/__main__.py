"""``python -m bnkit`` runs the command line."""

from bnkit.cli.main import main

raise SystemExit(main())
