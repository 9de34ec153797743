"""macmesh: one LLM endpoint over a lab of Apple-Silicon Macs."""

__version__ = "0.1.0"
