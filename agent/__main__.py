"""`python -m agent` is the `gpu-node-agent` command."""

from agent.cli import main

raise SystemExit(main())
