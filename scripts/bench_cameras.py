#!/usr/bin/env python3
"""Many cameras: N looped RTSP streams on 127.0.0.1 into one `cafi-stream serve`, against N single-camera processes.

```
scripts/bench_cameras.py N [--seconds 90] [--video VIDEO] [--loops 12] [--singles] [--restarts K]
                         [run options, e.g. --iqa piqe --fr-model MODEL]
```

Each stream is GStreamer's rtsp-server (tests/rtsp_server.py, Debian's python3-gi) paying out a looped copy of the
video in real time. Prints one JSON object: per camera the processed fps, the share of frames dropped, the p50 and
p95 frame-to-event latency (an event's publication minus the time its track was last seen), events and tracks
written; the serve process's peak RSS and its min / mean / max after `--warmup` seconds (a soak: `--seconds 1800`);
with `--singles`, the same for the summed RSS of N `cafi-stream` processes, one per camera, over the same streams; with `--restarts K`, camera 0's RTSP server is killed and restarted K times during
the run (the other cameras' processed fps is what to compare with a run without restarts).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import VIDEO, looped_copy  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER = ROOT / "tests" / "rtsp_server.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stream:
    """One RTSP server on 127.0.0.1 that can be killed and started again on the same port."""

    def __init__(self, video: Path):
        self.video, self.port, self.proc = video, free_port(), None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/stream"

    def start(self) -> "Stream":
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(SERVER), str(self.port), str(self.video)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the RTSP server did not start (GStreamer's rtsp-server and python3-gi installed?)")
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssSampler:
    """The summed RSS of some processes, sampled every second from their start."""

    def __init__(self, pids):
        self.pids, self.samples, self._stop = list(pids), [], threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append((time.monotonic() - self._t0, sum(rss_mb(p) for p in self.pids)))

    def stop(self, warmup: float) -> dict:
        """Peak RSS, and min / mean / max after `warmup` seconds (a soak's flatness)."""
        self._stop.set()
        self._thread.join()
        late = [r for t, r in self.samples if t >= warmup] or [0.0]
        return {"peak_rss_mb": round(max((r for _, r in self.samples), default=0.0), 1),
                "rss_after_warmup_mb": [round(min(late), 1), round(sum(late) / len(late), 1), round(max(late), 1)]}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def camera_figures(out: Path, events: list[dict], name: str, seconds: float) -> dict:
    summaries = [json.loads(p.read_text()) for p in sorted((out / name).glob("*/summary.json"))]
    live = [s.get("live") or {} for s in summaries]
    frames_in = sum(h.get("frames_in", 0) for h in live)
    dropped = sum(h.get("dropped", 0) for h in live)
    lat = [e["created"] - e["seen_at"] for e in events if e["camera"] == name and e["final"]]
    busy = sum(s["seconds"]["processing"] for s in summaries) or seconds
    return {"processed_fps": round(sum(h.get("processed", 0) for h in live) / busy, 2),
            "frames_in": frames_in, "dropped": dropped,
            "dropped_share": round(dropped / frames_in, 4) if frames_in else None,
            "reconnects": sum(h.get("reconnects", 0) for h in live),
            "latency_p50_s": percentile(lat, 0.5), "latency_p95_s": percentile(lat, 0.95),
            "events": sum(e["camera"] == name for e in events),
            "tracks_written": sum(s.get("tracks_written", 0) for s in summaries)}


def run_serve(streams: list[Stream], seconds: float, restarts: int, run_args: list[str], tmp: Path,
              warmup: float) -> dict:
    out, events = tmp / "serve", tmp / "events.jsonl"
    cmd = [sys.executable, "-m", "cafi_stream.cli", "serve", *(s.url for s in streams), "--out", str(out),
           "--http", "off", "--events", f"jsonl:{events}", *run_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sampler = RssSampler([proc.pid])
    end = time.monotonic() + seconds
    if restarts:   # camera 0's server goes away and comes back, evenly over the run
        gap = seconds / (restarts + 1)
        for _ in range(restarts):
            time.sleep(max(0.0, min(gap, end - time.monotonic()) - 2))
            streams[0].kill()
            time.sleep(2)
            streams[0].start()
    time.sleep(max(0.0, end - time.monotonic()))
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=300)
    rss = sampler.stop(warmup)
    made = [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []
    final = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
    return {"exit_code": proc.returncode, **rss, "engines": final.get("engines"),   # calls and the rows they joined
            "cameras": {n: camera_figures(out, made, n, seconds) for n in final.get("cameras", {})}}


def run_singles(streams: list[Stream], seconds: float, run_args: list[str], tmp: Path, warmup: float) -> dict:
    procs = [subprocess.Popen([sys.executable, "-m", "cafi_stream.cli", s.url, "--out", str(tmp / f"single{i}"),
                               "--quiet", *run_args], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for i, s in enumerate(streams)]
    sampler = RssSampler([p.pid for p in procs])
    time.sleep(seconds)
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        p.wait(timeout=300)
    return {"processes": len(procs), **sampler.stop(warmup)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("n", type=int)
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--video", default=str(VIDEO))
    p.add_argument("--loops", type=int, default=12, help="plays of the video in each stream's file")
    p.add_argument("--singles", action="store_true", help="also N single-camera processes, for their RSS")
    p.add_argument("--restarts", type=int, default=0, help="kill and restart camera 0's server this many times")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before RSS counts as steady (a soak's)")
    args, run_args = p.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video = looped_copy(Path(args.video), tmp / "looped.mp4", args.loops)
        streams = [Stream(video).start() for _ in range(args.n)]
        try:
            report = {"cameras": args.n, "seconds": args.seconds, "video": Path(args.video).name,
                      "run_args": run_args, "restarts": args.restarts,
                      "serve": run_serve(streams, args.seconds, args.restarts, run_args, tmp, args.warmup)}
            if args.singles:
                report["singles"] = run_singles(streams, args.seconds, run_args, tmp, args.warmup)
        finally:
            for s in streams:
                s.kill()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
