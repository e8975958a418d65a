#!/usr/bin/env python3
"""Compare every available backend's outputs and speed on this machine; prints one JSON object.

    scripts/verify_engines.py [--device auto|cpu|cuda] [--fr-model PATH|NAME] [--models-dir DIR]
                              [--dbcnn-weights real|random] [--batch 16] [--repeat 5]

For each network (the face-recognition backbone cut at its embedding layer, and DBCNN) it runs the same batch of
real face crops (../shared/data/faces, or $CAFI_SHARED_DATA/faces) through each backend available for the
device, reports the largest relative difference from the reference (torch on the CPU in fp32) and the
throughput at batch 1 and at --batch. Run it on a GPU machine with `pip install .[gpu]` to check TensorRT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cafi_stream.backend import available_backends, create_engine, resolve_device  # noqa: E402


def face_crops(size: int, count: int) -> np.ndarray:
    import cv2

    folder = Path(os.environ.get("CAFI_SHARED_DATA", ROOT.parent / "shared" / "data")) / "faces"
    images = []
    for path in sorted(folder.glob("*.*"))[:count] if folder.is_dir() else []:
        img = cv2.imread(str(path))
        if img is not None:
            h, w = img.shape[:2]
            s = min(h, w)
            img = img[(h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2]
            images.append(cv2.cvtColor(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA),
                                       cv2.COLOR_BGR2RGB))
    while len(images) < count:   # no shared data: repeat what there is, or noise
        images.append(images[len(images) % len(images)] if images else
                      np.random.default_rng(len(images)).integers(0, 256, (size, size, 3), np.uint8))
    return np.stack(images)


def speed(engine, x: np.ndarray, repeat: int) -> float:
    engine(x)   # warm-up (and, for TensorRT, nothing to build: the engine is already loaded)
    t0 = time.perf_counter()
    for _ in range(repeat):
        engine(x)
    return round(repeat * len(x) / (time.perf_counter() - t0), 1)


def compare(source, x: np.ndarray, device: str, batch: int, repeat: int) -> dict:
    ref = create_engine(source, "torch", "cpu", fp16=False)(x)
    out = {}
    for backend in available_backends(device):
        try:
            engine = create_engine(source, backend, device, max_batch=batch)
            y = engine(x)
            rel = float(np.max(np.abs(y - ref)) / (np.max(np.abs(ref)) + 1e-12))
            out[f"{backend}/{engine.device}"] = {"max_rel_diff": rel, "img_per_s_batch1": speed(engine, x[:1], repeat),
                                                 f"img_per_s_batch{len(x)}": speed(engine, x, repeat)}
        except Exception as e:   # report a broken backend, keep checking the others
            out[backend] = {"error": f"{type(e).__name__}: {e}"}
    return out


def serfiq_parity(fr_path, device: str, batch: int, repeat: int) -> dict:
    """SER-FIQ scores (T=100 passes) on `device`'s fastest backend against the CPU reference."""
    from cafi_stream.models import resolve_fr_model
    from cafi_stream.serfiq import SerFiq

    _, spec = resolve_fr_model(str(fr_path), Path(fr_path).parent)
    faces = face_crops(112, batch)
    ref = SerFiq(fr_path, spec, device="cpu", backend="ort")
    fast = SerFiq(fr_path, spec, device=device, batch=batch)
    a, b = ref(faces), fast(faces)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fast(faces)
    return {"backend": f"{fast.engine.backend}/{fast.engine.device}",
            "max_abs_score_diff": float(np.max(np.abs(a.scores - b.scores))),
            "max_abs_embedding_diff": float(np.max(np.abs(a.embeddings - b.embeddings))),
            "faces_per_s": round(repeat * len(faces) / (time.perf_counter() - t0), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--fr-model", default=str(ROOT.parent / "shared/data/models/mobilefacenet_paddlex_128d.onnx"))
    p.add_argument("--models-dir", default="")
    p.add_argument("--dbcnn-weights", default="random", choices=["real", "random"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    device = resolve_device(args.device)

    import onnx
    import torch

    from cafi_stream.export import fr_backbone_source, torch_source
    from cafi_stream.iqa import build_dbcnn, load_dbcnn_checkpoint
    from cafi_stream.models import DBCNN_CHECKPOINTS, default_models_dir, resolve, resolve_fr_model, sha256_of
    from cafi_stream.serfiq import find_embedding_head

    report = {"device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
              "backends": available_backends(device), "dbcnn_weights": args.dbcnn_weights}
    fr_path, _ = resolve_fr_model(args.fr_model, default_models_dir(args.models_dir))
    model = onnx.load(str(fr_path))
    fr = fr_backbone_source(model, sha256_of(fr_path), find_embedding_head(model).cut)
    x = (face_crops(fr.input_shape[1], args.batch).transpose(0, 3, 1, 2).astype(np.float32) - 127.5) / 127.5
    report["fr_backbone"] = compare(fr, x, device, args.batch, args.repeat)

    torch.manual_seed(0)
    net = build_dbcnn()
    key = "random0"
    if args.dbcnn_weights == "real":
        weights = resolve(DBCNN_CHECKPOINTS["koniq"], default_models_dir(args.models_dir))
        load_dbcnn_checkpoint(net, weights)
        key = sha256_of(weights)
    dbcnn = torch_source("dbcnn", net, key, (3, 384, 384))
    x = face_crops(384, args.batch).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    report["dbcnn"] = compare(dbcnn, x, device, args.batch, args.repeat)
    report["serfiq"] = serfiq_parity(fr_path, device, args.batch, args.repeat)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
