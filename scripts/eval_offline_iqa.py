#!/usr/bin/env python3
"""Offline IQA models side by side on real video: could any of them replace PIQE as the stand-in for DBCNN where
nothing can be downloaded? Prints one JSON object (and writes it to --out).

    scripts/eval_offline_iqa.py [--out FILE] [--every 4]

The video is eval_real's report video (its report clips, seed 0). Every `--every`th frame, its largest face is
masked as the pipeline masks it (384x384, outside the face oval black) and scored by each model that builds here
without a download:
- pyiqa's PIQE (no parameters);
- BRISQUE from the `brisque` wheel, whose SVM ships inside it (`pip install brisque libsvm-official
  scikit-image`; skipped when not installed);
- pyiqa's NIQE, BRISQUE and IL-NIQE, whose parameters are downloads (reported as such when they cannot build).
Reported per model: the within-person AUC per degradation kind, each model oriented so that higher is better.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import eval_real  # noqa: E402


def masked_faces(video: Path, every: int):
    """(frame index, 384x384 masked face) of the largest face of every `every`th frame."""
    from cafi_stream.align import crop_face
    from cafi_stream.analyse import FaceAnalysis

    faces = FaceAnalysis.configured()
    with av.open(str(video)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i % every:
                continue
            img = frame.to_ndarray(format="rgb24")
            d, lm = faces.largest(img)
            if lm is not None:
                yield i, crop_face(img, d.xyxy[0], lm).masked
    faces.close()


def models() -> dict:
    """name -> scorer(images) with higher meaning better, or the reason it cannot build here."""
    from cafi_stream.errors import CafiError
    from cafi_stream.iqa import create_iqa
    from cafi_stream.models import default_models_dir

    out = {}
    for name in ("piqe", "niqe", "brisque", "ilniqe"):
        try:
            m = create_iqa(name, "cpu", default_models_dir(""))
            out[f"pyiqa {name}"] = lambda x, m=m: np.array([m.oriented(v) for v in m(x)])
        except CafiError as e:
            out[f"pyiqa {name}"] = str(e)
    try:
        from brisque import BRISQUE

        wheel = BRISQUE(url=False)
        out["brisque wheel"] = lambda x: -np.array([wheel.score(img) for img in x])   # lower is better
    except Exception as e:   # not installed, or its imports fail
        out["brisque wheel"] = f"cannot build: {str(e).splitlines()[0] if str(e) else e!r}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    p.add_argument("--every", type=int, default=4)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "report.mp4"
        truth = eval_real.build_video(eval_real.clips("report"), video, 0)
        frames, faces = zip(*masked_faces(video, args.every))
    faces = np.stack(faces)
    result = {"faces": len(faces), "every": args.every, "models": {}}
    for name, scorer in models().items():
        if isinstance(scorer, str):
            result["models"][name] = {"unavailable": scorer}
            continue
        scores = np.concatenate([scorer(faces[i:i + 16]) for i in range(0, len(faces), 16)])
        rows = [{"frame_index": f, "s": float(s)} for f, s in zip(frames, scores)]
        result["models"][name] = {"auc_by_kind": eval_real.auc_by_kind(rows, truth, lambda r: r["s"])}
        print(name, result["models"][name], file=sys.stderr)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
