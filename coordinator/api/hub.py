"""TODO(hub): filled in by the issue-17 work."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api", tags=["admin"])
