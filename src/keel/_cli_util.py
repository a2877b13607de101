"""Small helpers shared by the ``keel`` command's groups."""

from __future__ import annotations

import getpass
import os


def cli_user() -> str:
    """Who ran the command, as recorded in ``created_by`` columns: ``cli:<login>``."""
    try:
        name = os.environ.get("USER") or getpass.getuser()
    except Exception:  # no login name (containers without a passwd entry)
        name = "unknown"
    return f"cli:{name}"
