"""`python -m moedeploy ...`: the CLI, where the package is importable but not installed (a GPU machine
with its own Python, say)."""

import sys

from .cli import main

sys.exit(main())
