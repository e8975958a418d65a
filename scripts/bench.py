#!/usr/bin/env python3
"""Benchmark cafi-stream on one video; prints one JSON object on stdout.

    scripts/bench.py VIDEO [--upscale 720|1080] [--exhaustive] [--random-dbcnn] [--random-r50] [--compare-exhaustive]
                     [cafi-stream run options: --fr-model, --iqa, --backend, --device, --topk, --config, ...]

It measures, for the same video: decode-only fps (PyAV threaded decode, nothing else; before and after the run,
averaged) and the same with every frame converted to RGB, end-to-end fps of the pipeline (models loaded
beforehand), milliseconds per frame of each stage, IQA (DBCNN) calls, peak RSS, the backend and device.
`--compare-exhaustive` also runs the exhaustive reference and reports how much of its top-k the run kept.
`--random-dbcnn` uses a randomly initialised DBCNN and `--random-r50` a randomly initialised network of the
default recognition model's exact topology (ArcFace R50: iresnet50, 25088->512 head): their cost is real, their
scores mean nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# The face detectors' files (SCRFD, YuNet) are read from the shared models, as a site's model store.
os.environ.setdefault("CAFI_MODEL_PATH", str(ROOT.parent / "shared" / "data" / "models" / "optional"))
sys.path.insert(0, str(ROOT))

from cafi_stream.cli import config_overrides, build_parser  # noqa: E402
from cafi_stream.config import load_config  # noqa: E402
from cafi_stream.decode import Decoder  # noqa: E402
from cafi_stream.detect import box_iou  # noqa: E402


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


def decode_fps(video: str, rgb: bool = False) -> float:
    """The decoder alone: frames decoded and handed over, none converted to RGB (the pipeline converts a frame,
    or part of it, only where a stage needs it); with `rgb`, every whole frame converted too (the earlier
    decoder's cost)."""
    t0 = time.perf_counter()
    n = 0
    for frame in Decoder(video).frames():
        if rgb:
            frame.image   # noqa: B018 - converts it (a cached property)
        n += 1
    return n / (time.perf_counter() - t0)


def _iou(a, b) -> float:
    return float(box_iou(np.array([a], np.float32), np.array([b], np.float32))[0, 0])


def topk_overlap(reference: list, rows: list, tolerance: float) -> dict:
    """Share of the reference's kept faces that the run also kept: the same frame, or the same person (box IoU
    >= 0.3) within `tolerance` seconds (kept faces of a track are min_gap apart, so that is one moment)."""
    same_frame = sum(any(r.frame_index == ref.frame_index and _iou(r.bbox, ref.bbox) >= 0.3
                         for r in rows) for ref in reference)
    near = sum(any(abs(r.pts_time - ref.pts_time) <= tolerance and _iou(r.bbox, ref.bbox) >= 0.3
                   for r in rows) for ref in reference)
    n = max(1, len(reference))
    return {"same_moment": round(near / n, 3), "same_frame": round(same_frame / n, 3), "reference_faces": len(reference)}


def iresnet50_onnx(path: Path) -> Path:
    """ArcFace R50's topology (insightface's iresnet50: 3-4-14-3 pre-activation basic blocks, widths 64-512, then
    BN, flatten, a 25088->512 linear layer and BN), randomly initialised, exported to ONNX with a dynamic batch."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.body = nn.Sequential(
                nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
                nn.PReLU(cout), nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return self.body(x) + self.skip(x)

    torch.manual_seed(0)   # the same weights every run: one cached backbone (engines/), not a new 123 MB one a run
    layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)], 64
    for cout, blocks in zip((64, 128, 256, 512), (3, 4, 14, 3)):
        for i in range(blocks):
            layers.append(Block(cin, cout, 2 if i == 0 else 1))
            cin = cout
    layers += [nn.BatchNorm2d(512), nn.Flatten(), nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512)]
    net = nn.Sequential(*layers).eval()
    with torch.no_grad():   # trained-looking statistics (and no identical tensors for the exporter to merge)
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.1, 0.4)
    torch.onnx.export(net, torch.zeros(1, 3, 112, 112), str(path), input_names=["input"], output_names=["embedding"],
                      dynamic_axes={"input": {0: "n"}, "embedding": {0: "n"}}, opset_version=17, dynamo=False)
    return path


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def run_once(video: str, cfg, out: Path, random_dbcnn: bool) -> tuple[dict, list]:
    from cafi_stream.pipeline import Models, run
    from cafi_stream.rows import read_face_rows

    models = Models.load(cfg, random_dbcnn=random_dbcnn)
    result = run(video, cfg, out_dir=out, models=models)
    models.close()
    return result.summary, read_face_rows(out / "metadata.jsonl")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("video")
    p.add_argument("--upscale", type=int, choices=[720, 1080])
    p.add_argument("--random-dbcnn", action="store_true")
    p.add_argument("--random-r50", action="store_true", help="the default recognition model's topology, random weights")
    p.add_argument("--compare-exhaustive", action="store_true")
    p.add_argument("--compact", action="store_true", help="the JSON object on one line")
    args, rest = p.parse_known_args(argv)
    run_args = build_parser().parse_args([args.video, *rest])
    cfg = load_config(run_args.config, config_overrides(run_args))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video = upscale(args.video, args.upscale, tmp) if args.upscale else args.video
        if args.random_r50:
            cfg.fr.model = str(iresnet50_onnx(tmp / "iresnet50_random.onnx"))
        # Decode-only before and after the run, averaged: on a shared machine it drifts by up to a quarter within
        # minutes, and the ratio to it is the figure that matters.
        dec_runs = [decode_fps(video)]
        summary, rows = run_once(video, cfg, tmp / "run", args.random_dbcnn)
        dec_runs.append(decode_fps(video))
        dec_fps = sum(dec_runs) / len(dec_runs)
        frames = summary["frames"]
        report = {
            "video": args.video,
            "resolution": f"{summary['video']['width']}x{summary['video']['height']}",
            "frames": frames,
            "decode_fps": round(dec_fps, 1),
            "decode_fps_runs": [round(v, 1) for v in dec_runs],
            "decode_rgb_fps": round(decode_fps(video, rgb=True), 1),
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
            "gpu": gpu_name() if summary["device"] == "cuda" else None,
            # at most: faces per SER-FIQ and IQA call (micro-batched over frames), frames per detector call
            "batch": {"serfiq": min(cfg.serfiq.batch, cfg.runtime.max_batch), "iqa": cfg.runtime.max_batch,
                      "detector": summary["detection_frames_per_call"]},
            "random_dbcnn": args.random_dbcnn,
            "random_r50": args.random_r50,
            "detector": summary["engines"]["face_detector"],
        }
        report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if args.compare_exhaustive and not cfg.cascade.exhaustive:
            cfg.cascade.exhaustive = True
            ref_summary, ref_rows = run_once(video, cfg, tmp / "exhaustive", args.random_dbcnn)
            report["exhaustive_iqa_calls"] = ref_summary["faces"]["iqa_calls"]
            report["exhaustive_e2e_fps"] = ref_summary["fps"]
            report["iqa_call_reduction"] = round(ref_summary["faces"]["iqa_calls"] / max(1, report["iqa_calls"]), 2)
            report["topk_overlap"] = topk_overlap(ref_rows, rows, cfg.output.min_gap)
    print(json.dumps(report, indent=None if args.compact else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
