"""The rich console every command prints its tables with."""
from __future__ import annotations

import sys


def console(stderr: bool = False):
    """A rich Console; when the stream is not a terminal (a log file, a pipe) tables get 160 columns
    instead of rich's default 80, so wide tables stay readable."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 160)
