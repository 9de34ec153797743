"""Model discovery and conversion on a node."""
