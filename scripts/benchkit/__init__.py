"""Shared pieces of the load test and the benchmarks under `scripts/`.

Not part of the gateway: nothing in `gateway/` or `mock_accoil/` imports it. The scripts
put `scripts/` on `sys.path` (Python does it for a script run by path), so these modules
import as `benchkit.<name>`.
"""
