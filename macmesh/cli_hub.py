"""TODO(cli_hub): filled in by the issue-17 work."""

from __future__ import annotations

from typing import Any


def add_parsers(msub: Any) -> None:
    """Register this module's `macmesh models` actions."""
