"""The benchmark package: what `macmesh bench`, the scripts in bench/ and the tests share.

`procs` starts and stops child processes (nodes, coordinators, llama-server,
mlx_lm.server) and describes the machine; `stats` holds the one percentile;
`workloads` and `routing` are `macmesh bench routing`.
"""
