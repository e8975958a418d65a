#!/usr/bin/env python3
"""Soak test: run cafi-stream on a `--loop` live source for a while and sample its memory; prints one JSON object.

    scripts/soak.py [VIDEO] [--minutes 15] [--warmup 120] [--interval 10] [cafi-stream options ...]

VIDEO defaults to ../shared/data/videos/short_hamilton_clip.mp4 (played in a loop at its native rate). RSS is read
from /proc every --interval seconds; after --warmup seconds it should stay within +-10% of its post-warm-up mean.
The run ends with SIGINT, which must exit 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The face detectors' files (SCRFD, YuNet) are read from the shared models, as a site's model store.
os.environ.setdefault("CAFI_MODEL_PATH", str(ROOT.parent / "shared" / "data" / "models" / "optional"))
SHARED = ROOT.parent / "shared" / "data"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("video", nargs="?", default=str(SHARED / "videos" / "short_hamilton_clip.mp4"))
    p.add_argument("--minutes", type=float, default=15)
    p.add_argument("--warmup", type=float, default=120, help="seconds before RSS is held to the +-10% band")
    p.add_argument("--interval", type=float, default=10)
    args, rest = p.parse_known_args(argv)
    if not any(a == "--fr-model" for a in rest):
        rest += ["--fr-model", str(SHARED / "models" / "mobilefacenet_paddlex_128d.onnx")]
    if not any(a == "--iqa" for a in rest):
        rest += ["--iqa", "piqe"]
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "stats.json"
        cmd = [sys.executable, "-m", "cafi_stream.cli", args.video, "--loop", "--quiet", "--out", f"{tmp}/out",
               "--stats-json", str(stats), *rest]
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        samples = []
        while time.monotonic() - t0 < args.minutes * 60 and proc.poll() is None:
            time.sleep(args.interval)
            s = json.loads(stats.read_text()) if stats.exists() else {}
            samples.append({"t": round(time.monotonic() - t0, 1), "rss_mb": round(rss_mb(proc.pid), 1),
                            "processed": s.get("processed"), "dropped": s.get("dropped"),
                            "tracks_written": s.get("tracks_written")})
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
        stderr = proc.stderr.read()
        summary = json.loads((Path(tmp) / "out" / "summary.json").read_text()) if code == 0 else {}
    after = [s["rss_mb"] for s in samples if s["t"] >= args.warmup]
    mean = sum(after) / len(after) if after else float("nan")
    report = {
        "video": args.video, "minutes": args.minutes, "exit_code": code,
        "frames": summary.get("frames"), "tracks_written": summary.get("tracks_written"),
        "faces_kept": summary.get("faces_kept"), "dropped": (summary.get("live") or {}).get("dropped"),
        "rss_after_warmup_mb": {"min": min(after, default=None), "max": max(after, default=None),
                                "mean": round(mean, 1)},
        "rss_within_10pct": bool(after) and all(abs(r - mean) <= 0.1 * mean for r in after),
        "samples": samples,
        "stderr_tail": stderr.strip().splitlines()[-3:],
    }
    print(json.dumps(report, indent=2))
    return 0 if code == 0 and report["rss_within_10pct"] else 1


if __name__ == "__main__":
    sys.exit(main())
