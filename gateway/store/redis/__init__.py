"""The Redis backend (scale-out, SCALING.md): partitions, the inbox streams, leases.

Built so far: partitioning, the durable inbox (ingest's side and the owner's reading side)
and partition ownership with fencing epochs. Applying and forwarding from Redis wait on
the pipeline core's store interfaces (issue 9).
"""
