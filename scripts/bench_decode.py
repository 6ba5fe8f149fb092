"""The worker's decode of stored bodies: `decode_stored` on the sustained benchmark's bodies.

    python scripts/bench_decode.py                                       # this tree only
    python scripts/bench_decode.py --baseline /path/to/other/gateway/segment.py

Bodies: `--bodies` batches of 100 messages as `bench_sustained.py` sends them (unique track
calls), and as many of the load test's default call mix. Each round times `--passes` passes
over the bodies with each module in turn (this tree's `gateway/segment.py`, then the baseline's, loaded from
its file side by side in this process), so that both see the same machine in the same
moments; the CPU time of this thread, per message, freeing what the decode built included.
Reported: the fastest round and the median, per module and traffic, and the ratio of the
medians (this tree's over the baseline's). The last line is JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import msgspec
from benchkit.traffic import Traffic

HERE = Path(__file__).resolve().parent.parent / "gateway" / "segment.py"
MIXES: dict[str, dict[str, float] | None] = {"track": {"track": 1.0}, "mixed": None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, help="another tree's gateway/segment.py")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--passes", type=int, default=5, help="over the bodies, per round and module")
    p.add_argument("--bodies", type=int, default=20, help="100-message batches per traffic")
    return p.parse_args(argv)


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # msgspec resolves the module's annotations through it
    spec.loader.exec_module(module)
    return module


def per_message(
    decode: Callable[[bytes], object], bodies: list[bytes], messages: int, passes: int
) -> float:
    start = time.thread_time_ns()
    for _ in range(passes):
        for body in bodies:
            decode(body)
    return (time.thread_time_ns() - start) / (messages * passes)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    modules = {"this": load("segment_this", HERE)}
    if args.baseline is not None:
        modules["baseline"] = load("segment_baseline", args.baseline)
    report: dict[str, dict[str, dict[str, float]]] = {}
    for mix_name, mix in MIXES.items():
        traffic = Traffic(accounts=500, users=5000, mix=mix, seed=1)
        bodies = [traffic.batch(100).body for _ in range(args.bodies)]
        counts = {name: sum(len(m.decode_stored(b).messages) for b in bodies)
                  for name, m in modules.items()}
        assert len(set(counts.values())) == 1, f"the modules disagree: {counts}"
        samples: dict[str, list[float]] = {name: [] for name in modules}
        for _ in range(args.rounds):
            for name, module in modules.items():
                samples[name].append(
                    per_message(module.decode_stored, bodies, counts[name], args.passes)
                )
        report[mix_name] = {}
        for name, got in samples.items():
            got.sort()
            report[mix_name][name] = {"min_ns_per_message": round(got[0], 1),
                                      "median_ns_per_message": round(got[len(got) // 2], 1)}
            print(f"{mix_name:6} {name:8} {got[0]:7.1f} ns a message at best, "
                  f"{got[len(got) // 2]:7.1f} median")
        if "baseline" in samples:
            ratio = report[mix_name]["this"]["median_ns_per_message"] / report[mix_name][
                "baseline"]["median_ns_per_message"]
            report[mix_name]["this"]["median_vs_baseline"] = round(ratio, 3)
            print(f"{mix_name:6} this / baseline, medians: {ratio:.3f}")
    print(msgspec.json.encode(report).decode())


if __name__ == "__main__":
    main()
