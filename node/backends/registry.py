"""Every backend a node can run, in lookup order: one line per backend."""

from __future__ import annotations

from node.backends import group, llamacpp, mlx, sim, speech
from node.backends.base import BackendFactory

FACTORIES: tuple[BackendFactory, ...] = (
    sim.create,  # first: simulated models shadow anything of the same name on disk
    speech.create,  # built-in voice models (mesh.audio), before anything on disk
    group.create,  # node groups this node is rank 0 of (named apart from every model)
    mlx.create,
    llamacpp.create,
)
