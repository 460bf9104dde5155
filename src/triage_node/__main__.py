"""Allow ``python -m triage_node``."""

from triage_node.cli import main

raise SystemExit(main())
