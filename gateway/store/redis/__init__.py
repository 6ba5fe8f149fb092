"""The Redis backend (scale-out, SCALING.md): every store role on one Redis or Redis Cluster.

`partition.py` (who goes where, key names), `connect.py`, `inbox.py` (the streams),
`wire.py` (hot-path commands packed in C, sent on one connection),
`lease.py` (ownership and fencing), `state.py`, `outbox.py`, `dead.py` (each role's keys and
its turn side), `ops.py` and `scripts.py` (a turn's buffered writes and the fenced scripts
that commit them), `store.py` (`RedisStore`, the roles joined), `metrics.py`.
"""
