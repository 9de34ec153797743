"""The macmesh version: here, so nodes, coordinators and the CLI all may import it."""

__version__ = "0.1.0"
