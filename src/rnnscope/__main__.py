"""`python -m rnnscope` is the `rnnscope` command."""

from .cli import main

raise SystemExit(main())
