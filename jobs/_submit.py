"""Shared body of the ``jobs/*.py`` spark-submit entry points."""

from __future__ import annotations

import sys

from jobs.cli import main


def submit(command: str) -> None:
    """Run ``spark-train COMMAND <argv>`` under spark-submit and exit with its code."""
    sys.exit(main([command, *sys.argv[1:]], under_submit=True))
