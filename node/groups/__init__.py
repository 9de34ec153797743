"""Node groups: one MLX model sharded over several nodes with mx.distributed
(docs/groups.md). `driver` runs in the node agent; `rank` is the rank process."""
