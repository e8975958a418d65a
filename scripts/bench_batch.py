#!/usr/bin/env python3
"""Benchmark `cafi-stream batch`: throughput per execution mode, and the cost of a resume; one JSON object.

    scripts/bench_batch.py VIDEO [--copies 6] [--workers 1 2] [--ray] [batch options: --iqa, --fr-model, ...]

Each mode processes `copies` copies of VIDEO (separate files, so separate videos of the batch) into a fresh
folder through the real CLI, models loading included, then reruns the same command, which must skip them all.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The face detectors' files (SCRFD, YuNet) are read from the shared models, as a site's model store.
os.environ.setdefault("CAFI_MODEL_PATH", str(ROOT.parent / "shared" / "data" / "models" / "optional"))


def timed(cmd: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench_batch: {' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    return wall, json.loads(proc.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("video")
    p.add_argument("--copies", type=int, default=6)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--ray", action="store_true", help="also run on a local Ray cluster")
    args, batch_opts = p.parse_known_args()
    cli = [sys.executable, "-m", "cafi_stream.cli", "batch"]
    modes = [(f"workers={w}", ["--workers", str(w)]) for w in args.workers]
    if args.ray:
        modes.append(("ray-local", ["--ray"]))
    results = []
    with tempfile.TemporaryDirectory(prefix="cafi-bench-batch-") as tmp:
        inputs = []
        for i in range(args.copies):
            dst = Path(tmp) / "in" / f"copy{i:02d}{Path(args.video).suffix}"
            dst.parent.mkdir(exist_ok=True)
            shutil.copy(args.video, dst)
            inputs.append(str(dst))
        for name, extra in modes:
            out = Path(tmp) / name
            wall, res = timed(cli + inputs + ["--out", str(out), *extra, *batch_opts])
            if res["done"] != args.copies:
                sys.exit(f"bench_batch: {name}: {res}")
            frames = sum(json.loads(s.read_text())["frames"] for s in (out / "videos").glob("*/summary.json"))
            resume, again = timed(cli + inputs + ["--out", str(out), *extra, *batch_opts])
            results.append({"mode": name, "videos": args.copies, "frames": frames, "seconds": round(wall, 2),
                            "videos_per_min": round(60 * args.copies / wall, 2), "fps": round(frames / wall, 1),
                            "faces": res["faces"], "identities": res["identities"],
                            "resume_seconds": round(resume, 2), "resume_skipped": again["skipped"]})
            print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({"video": args.video, "options": batch_opts, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
