"""The decodes of `gateway/segment.py` on the benchmarks' bodies: by default the worker's
`decode_stored`; with `--decode check` ingest's `check_batch` (the front's verdict in the
default two-process mode), with `--decode batch` the inline pipeline's `decode_batch`.

    python scripts/bench_decode.py                                       # this tree only
    python scripts/bench_decode.py --baseline /path/to/other/gateway/segment.py
    python scripts/bench_decode.py --decode check --callgrind --baseline /work/main/gateway/segment.py

Bodies: `--bodies` batches of 100 messages as `bench_sustained.py` sends them (unique track
calls), as many of the load test's default call mix, and as many as `bench_ingest.py` sends
(its accounts, users and mix), and those with a top-level `writeKey` as the Segment SDKs
send it (`sdk`). Each round times `--passes` passes
over the bodies with each module in turn (this tree's `gateway/segment.py`, then the baseline's, loaded from
its file side by side in this process), so that both see the same machine in the same
moments; the CPU time of this thread, per message, freeing what the decode built included.
Reported: the fastest round and the median, per module and traffic, and the ratio of the
medians (this tree's over the baseline's). The last line is JSON.

`--callgrind` counts instructions instead, which a loaded machine does not change: each
module and traffic runs under valgrind's callgrind twice, at `--passes` and at three times as
many (hash seed fixed), and the instructions per message are the difference over the
messages between (start-up, imports and the making of the bodies cancel out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import msgspec
from benchkit.traffic import DEFAULT_MIX, Traffic, parse_mix

HERE = Path(__file__).resolve().parent.parent / "gateway" / "segment.py"
# traffic: (accounts, users, mix); "ingest" as `bench_ingest.py` sends it by default
MIXES: dict[str, tuple[int, int, dict[str, float] | None]] = {
    "track": (500, 5000, {"track": 1.0}),
    "mixed": (500, 5000, None),
    "ingest": (1000, 10000, parse_mix(DEFAULT_MIX)),
    "sdk": (1000, 10000, parse_mix(DEFAULT_MIX)),  # `ingest`, a top-level writeKey added
}
DECODES = {"stored": "decode_stored", "check": "check_batch", "batch": "decode_batch"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, help="another tree's gateway/segment.py")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--passes", type=int, default=5, help="over the bodies, per round and module")
    p.add_argument("--bodies", type=int, default=20, help="100-message batches per traffic")
    p.add_argument("--decode", choices=sorted(DECODES), default="stored")
    p.add_argument("--traffic", default="track,mixed,ingest", help=f"of {', '.join(MIXES)}")
    p.add_argument("--callgrind", action="store_true",
                   help="count instructions (valgrind) instead of timing: one run per module "
                        "and traffic at --passes and at three times as many")
    p.add_argument("--child", nargs=2, metavar=("SEGMENT_PY", "TRAFFIC"),
                   help=argparse.SUPPRESS)  # one counted run: --passes over the bodies
    args = p.parse_args(argv)
    args.traffics = [t for t in args.traffic.split(",") if t]
    for t in args.traffics:
        if t not in MIXES:
            p.error(f"--traffic: unknown traffic {t!r}")
    if args.callgrind and shutil.which("valgrind") is None:
        p.error("--callgrind: valgrind is not installed")
    return args


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


def make_bodies(mix_name: str, count: int) -> list[bytes]:
    if mix_name == "sdk":  # `ingest`'s bodies with the key at the top, as the SDKs send it
        return [body[:-1] + b',"writeKey":"wk_bench"}' for body in make_bodies("ingest", count)]
    accounts, users, mix = MIXES[mix_name]
    traffic = Traffic(accounts=accounts, users=users, mix=mix, seed=1)
    return [traffic.batch(100).body for _ in range(count)]


def decoder(module: ModuleType, decode: str) -> Callable[[bytes], object]:
    function: Callable[[bytes], object] = getattr(module, DECODES[decode])
    return function


def accepted(module: ModuleType, decode: str, bodies: list[bytes]) -> int:
    """The messages `decode` accepts in `bodies`: what the modules must agree on."""
    read = decoder(module, decode)
    total = 0
    for body in bodies:
        out = read(body)
        total += int(getattr(out, "valid", None) or len(getattr(out, "messages", [])))
    return total


def child(args: argparse.Namespace) -> None:
    """One counted run (under callgrind): `--passes` over the bodies with one module."""
    path, mix_name = args.child
    module = load("segment_counted", Path(path))
    bodies = make_bodies(mix_name, args.bodies)
    read = decoder(module, args.decode)
    for _ in range(args.passes):
        for body in bodies:
            read(body)
    print(json.dumps({"messages": accepted(module, args.decode, bodies) * args.passes}))


def counted(args: argparse.Namespace, path: Path, mix_name: str, passes: int) -> tuple[int, int]:
    """(instructions, messages) of one `child` run under callgrind."""
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
           str(Path(__file__).resolve()), "--child", str(path), mix_name,
           "--decode", args.decode, "--passes", str(passes), "--bodies", str(args.bodies)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"the counted run of {path} failed:\n{done.stderr}")
    return int(found.group(1)), int(json.loads(done.stdout.strip().splitlines()[-1])["messages"])


def count_instructions(args: argparse.Namespace, paths: dict[str, Path]) -> None:
    report: dict[str, dict[str, dict[str, float]]] = {}
    for mix_name in args.traffics:
        report[mix_name] = {}
        for name, path in paths.items():
            small, few = counted(args, path, mix_name, args.passes)
            large, many = counted(args, path, mix_name, 3 * args.passes)
            per = (large - small) / (many - few)
            report[mix_name][name] = {"instructions_per_message": round(per, 1),
                                      "instructions_per_100": round(per * 100)}
            print(f"{mix_name:6} {name:8} {per:9.1f} instructions a message "
                  f"(load {os.getloadavg()[0]:.2f})")
        if "baseline" in paths:
            ratio = (report[mix_name]["this"]["instructions_per_message"]
                     / report[mix_name]["baseline"]["instructions_per_message"])
            report[mix_name]["this"]["vs_baseline"] = round(ratio, 3)
            print(f"{mix_name:6} this / baseline: {ratio:.3f}")
    print(msgspec.json.encode({"decode": args.decode, "callgrind": report}).decode())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    paths = {"this": HERE}
    if args.baseline is not None:
        paths["baseline"] = args.baseline.resolve()
    if args.callgrind:
        count_instructions(args, paths)
        return
    modules = {"this": load("segment_this", HERE)}
    if args.baseline is not None:
        modules["baseline"] = load("segment_baseline", args.baseline)
    report: dict[str, dict[str, dict[str, float]]] = {}
    for mix_name in args.traffics:
        bodies = make_bodies(mix_name, args.bodies)
        counts = {name: accepted(m, args.decode, bodies) for name, m in modules.items()}
        assert len(set(counts.values())) == 1, f"the modules disagree: {counts}"
        samples: dict[str, list[float]] = {name: [] for name in modules}
        for _ in range(args.rounds):
            for name, module in modules.items():
                samples[name].append(
                    per_message(decoder(module, args.decode), bodies, counts[name], args.passes)
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
    print(msgspec.json.encode({"decode": args.decode, **report}).decode())


if __name__ == "__main__":
    main()
