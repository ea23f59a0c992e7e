"""`python -m agentd` entry point."""

from agentd.cli import main

raise SystemExit(main())
