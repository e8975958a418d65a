#!/usr/bin/env python3
"""Benchmark cafi-stream on one video; prints one JSON object on stdout.

    scripts/bench.py VIDEO [--upscale 720|1080] [--exhaustive] [--random-dbcnn] [--compare-exhaustive]
                     [cafi-stream run options: --fr-model, --iqa, --backend, --device, --topk, --config, ...]

It measures, for the same video: decode-only fps (PyAV threaded decode to RGB, nothing else), end-to-end fps of
the pipeline (models loaded beforehand), milliseconds per frame of each stage, IQA (DBCNN) calls, peak RSS, the
backend and device. `--compare-exhaustive` also runs the exhaustive reference and reports how much of its top-k
the run kept. `--random-dbcnn` uses a randomly initialised DBCNN: its cost is real, its scores mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The face detectors' files (SCRFD, YuNet) are read from the shared models, as a site's model store.
os.environ.setdefault("CAFI_MODEL_PATH", str(ROOT.parent / "shared" / "data" / "models" / "optional"))
sys.path.insert(0, str(ROOT))

from cafi_stream.cli import _overrides, build_parser  # noqa: E402
from cafi_stream.config import load_config  # noqa: E402
from cafi_stream.decode import Decoder  # noqa: E402


def upscale(video: str, height: int, out_dir: Path) -> str:
    """Re-encode `video` at `height` lines (H.264, high quality) into out_dir."""
    import av

    dst = out_dir / f"{Path(video).stem}_{height}p.mp4"
    with av.open(video) as inp, av.open(str(dst), "w") as out:
        ist = inp.streams.video[0]
        width = round(ist.codec_context.width * height / ist.codec_context.height / 2) * 2
        ost = out.add_stream("libx264", rate=ist.average_rate, options={"crf": "16", "preset": "veryfast"})
        ost.width, ost.height, ost.pix_fmt = width, height, "yuv420p"
        for frame in inp.decode(ist):
            for packet in ost.encode(frame.reformat(width=width, height=height, format="yuv420p")):
                out.mux(packet)
        for packet in ost.encode():
            out.mux(packet)
    return str(dst)


def decode_fps(video: str) -> float:
    async def go():
        dec = Decoder(video)
        t0 = time.perf_counter()
        n = 0
        async for _ in dec.frames():
            n += 1
        return n / (time.perf_counter() - t0)

    return asyncio.run(go())


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def topk_overlap(reference: list[dict], rows: list[dict], tolerance: float) -> dict:
    """Share of the reference's kept faces that the run also kept: the same frame, or the same person (box IoU
    >= 0.3) within `tolerance` seconds (kept faces of a track are min_gap apart, so that is one moment)."""
    same_frame = sum(any(r["frame_index"] == ref["frame_index"] and _iou(r["bbox"], ref["bbox"]) >= 0.3
                         for r in rows) for ref in reference)
    near = sum(any(abs(r["pts_time"] - ref["pts_time"]) <= tolerance and _iou(r["bbox"], ref["bbox"]) >= 0.3
                   for r in rows) for ref in reference)
    n = max(1, len(reference))
    return {"same_moment": round(near / n, 3), "same_frame": round(same_frame / n, 3), "reference_faces": len(reference)}


def run_once(video: str, cfg, out: Path, random_dbcnn: bool) -> tuple[dict, list[dict]]:
    from cafi_stream.pipeline import Models, run

    models = Models.load(cfg, random_dbcnn=random_dbcnn)
    result = run(video, cfg, out_dir=out, models=models)
    models.close()
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    return result.summary, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("video")
    p.add_argument("--upscale", type=int, choices=[720, 1080])
    p.add_argument("--random-dbcnn", action="store_true")
    p.add_argument("--compare-exhaustive", action="store_true")
    args, rest = p.parse_known_args(argv)
    run_args = build_parser().parse_args([args.video, *rest])
    cfg = load_config(run_args.config, _overrides(run_args))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video = upscale(args.video, args.upscale, tmp) if args.upscale else args.video
        dec_fps = decode_fps(video)
        summary, rows = run_once(video, cfg, tmp / "run", args.random_dbcnn)
        frames = summary["frames"]
        report = {
            "video": args.video,
            "resolution": f"{summary['video']['width']}x{summary['video']['height']}",
            "frames": frames,
            "decode_fps": round(dec_fps, 1),
            "e2e_fps": summary["fps"],
            "e2e_vs_decode": round(summary["fps"] / dec_fps, 3),
            "realtime_factor": round(summary["fps"] / summary["video"]["fps"], 2),
            "stage_ms": {k: round(v * 1000 / frames, 3) for k, v in summary["seconds"].items()
                         if k not in ("processing", "load_models")},
            "load_models_s": summary["seconds"]["load_models"],
            "dbcnn_calls": summary["faces"]["iqa_calls"] if summary["iqa"] == "dbcnn" else 0,
            "iqa": summary["iqa"],
            "iqa_calls": summary["faces"]["iqa_calls"],
            "iqa_budget": None if cfg.cascade.exhaustive else cfg.cascade.iqa_budget * frames / summary["video"]["fps"]
            + cfg.cascade.iqa_burst,
            "serfiq_calls": summary["faces"]["serfiq_calls"],
            "faces_kept": summary["faces_kept"],
            "exhaustive": cfg.cascade.exhaustive,
            "backend": summary["engines"],
            "device": summary["device"],
            "random_dbcnn": args.random_dbcnn,
        }
        report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if args.compare_exhaustive and not cfg.cascade.exhaustive:
            cfg.cascade.exhaustive = True
            ref_summary, ref_rows = run_once(video, cfg, tmp / "exhaustive", args.random_dbcnn)
            report["exhaustive_iqa_calls"] = ref_summary["faces"]["iqa_calls"]
            report["exhaustive_e2e_fps"] = ref_summary["fps"]
            report["iqa_call_reduction"] = round(ref_summary["faces"]["iqa_calls"] / max(1, report["iqa_calls"]), 2)
            report["topk_overlap"] = topk_overlap(ref_rows, rows, cfg.output.min_gap)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
