"""Pure request resolution and routing policy (no I/O)."""
