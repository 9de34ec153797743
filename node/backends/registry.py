"""Every backend a node can run, in lookup order: one line per backend."""

from __future__ import annotations

from node.backends import llamacpp, mlx, sim
from node.backends.base import BackendFactory

FACTORIES: tuple[BackendFactory, ...] = (
    sim.create,  # first: simulated models shadow anything of the same name on disk
    mlx.create,
    llamacpp.create,
)
