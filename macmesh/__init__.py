"""macmesh: one LLM endpoint over a lab of Apple-Silicon Macs."""

from mesh.version import __version__

__all__ = ["__version__"]
