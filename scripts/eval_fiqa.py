#!/usr/bin/env python3
"""SER-FIQ as a face-image-quality measure, on the real face photos: severity correlation and Error-versus-Discard.

    scripts/eval_fiqa.py --out DIR [--quick] [--readme README.md]

- Spearman correlation, per degradation kind, between SER-FIQ and the quality level (0 clean .. 3 severe, negated),
  pooled over the photos: positive means SER-FIQ falls as the degradation grows.
- Error-versus-Discard curve (the standard FIQA protocol): every photo, clean and at each degradation, is a
  sample; genuine pairs are two samples of one identity from different photos, impostor pairs two identities. The
  comparison threshold is fixed at FMR = 1% over all impostor pairs; pairs are discarded lowest quality first (pair
  quality = the lower of its two samples'), and FNMR is measured on the genuine pairs that remain. Compared with
  sharpness (Laplacian variance) and random quality.

The data is small (a few dozen photos of six people); the numbers show the direction, not a benchmark result.
Writes DIR/fiqa.json and DIR/fiqa.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("CAFI_SHARED_DATA", ROOT.parent / "shared" / "data"))
# The face detectors' files (SCRFD, YuNet) are read from the shared models, as a site's model store.
os.environ.setdefault("CAFI_MODEL_PATH", str(SHARED / "models" / "optional"))

from cafi_stream import degrade  # noqa: E402

# One portrait at several resolutions is one photo, not several (../shared/data/README.md).
SAME_PORTRAIT = ("obama-240p", "obama-480p", "obama-720p", "obama-1080p", "obama_small", "train_obama_obama.")


def photo_key(name: str) -> str:
    return "obama_portrait" if any(t in name + "." for t in SAME_PORTRAIT) else name


def aligned_photos() -> dict[str, np.ndarray]:
    import cv2

    from cafi_stream.align import align_largest_face
    from cafi_stream.analyse import FaceAnalysis

    faces = FaceAnalysis.configured()
    out = {}
    for path in sorted((SHARED / "faces").iterdir()):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png") and not path.name.startswith("multi_"):
            img = np.ascontiguousarray(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
            face = align_largest_face(img, faces)
            if face is not None:
                out[path.stem] = face
    faces.close()
    return out


def sharpness_of(faces: np.ndarray) -> np.ndarray:
    from cafi_stream.cascade import sharpness

    return np.array([sharpness(f) for f in faces])


def edc(quality: np.ndarray, samples: list[dict], emb: np.ndarray, fmr: float, fractions) -> list[list[float]]:
    sims, pq, genuine = [], [], []
    for i, j in itertools.combinations(range(len(samples)), 2):
        a, b = samples[i], samples[j]
        if a["photo"] == b["photo"]:
            continue   # a photo and its own degraded copy: not a real comparison
        sims.append(float(emb[i] @ emb[j]))
        pq.append(min(quality[i], quality[j]))
        genuine.append(a["identity"] == b["identity"])
    sims, pq, genuine = np.array(sims), np.array(pq), np.array(genuine)
    threshold = np.quantile(sims[~genuine], 1 - fmr)
    order = np.argsort(pq[genuine])
    gen_sims = sims[genuine][order]
    curve = []
    for frac in fractions:
        keep = gen_sims[int(round(frac * len(gen_sims))):]
        curve.append([round(float(frac), 3), round(float(np.mean(keep < threshold)) if len(keep) else 0.0, 4)])
    return curve, int(genuine.sum()), int((~genuine).sum())


def main(argv=None) -> int:
    from scipy.stats import spearmanr

    from cafi_stream.models import FR_MODELS
    from cafi_stream.serfiq import SerFiq

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="fewer degradations (seconds)")
    p.add_argument("--fmr", type=float, default=0.01)
    p.add_argument("--readme", help="rewrite the table between <!-- fiqa:start/end --> in this file")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = SerFiq(SHARED / "models" / "mobilefacenet_paddlex_128d.onnx", FR_MODELS["mobilefacenet_paddlex_128d"])
    photos = aligned_photos()
    rng = np.random.default_rng(0)
    kinds = degrade.KINDS[:4] if args.quick else degrade.KINDS
    samples, images = [], []
    for name, face in photos.items():
        for kind, level in [("clean", 0)] + [(k, lv) for k in kinds for lv in (1, 2, 3)]:
            samples.append({"photo": photo_key(name), "identity": name.split("__")[0], "kind": kind, "level": level})
            images.append(degrade.apply(face, kind, level, rng))
    images = np.stack(images)
    result = model(images)
    scores = result.scores
    spearman = {}
    for kind in kinds:
        idx = [i for i, s in enumerate(samples) if s["kind"] in ("clean", kind)]
        spearman[kind] = round(float(spearmanr(scores[idx], [-samples[i]["level"] for i in idx]).statistic), 3)
    fractions = np.linspace(0, 0.8, 17)
    qualities = {"serfiq": scores, "sharpness": sharpness_of(images),
                 "random": np.random.default_rng(1).random(len(samples))}
    curves = {}
    for name, q in qualities.items():
        curves[name], n_gen, n_imp = edc(q, samples, result.embeddings, args.fmr, fractions)
    report = {"spearman": spearman, "edc": curves, "fmr": args.fmr, "genuine_pairs": n_gen,
              "impostor_pairs": n_imp, "photos": len(photos), "samples": len(samples),
              "model": "mobilefacenet_paddlex_128d",
              "note": "small data: a few dozen photos of six people, degraded synthetically; direction, not a benchmark"}
    (out / "fiqa.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "fiqa.png")
    if args.readme:
        update_readme(Path(args.readme), report)
    print(json.dumps({"spearman": spearman, "fnmr_at_0_and_40pct_discard": {
        k: [c[0][1], c[8][1]] for k, c in curves.items()}}, indent=2))
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    kinds = list(report["spearman"])
    a.bar(kinds, [report["spearman"][k] for k in kinds])
    a.axhline(0, color="grey", lw=0.5)
    a.set_title("Spearman(SER-FIQ, quality level)")
    a.tick_params(axis="x", rotation=30)
    for name, curve in report["edc"].items():
        xs, ys = zip(*curve)
        b.plot(xs, ys, marker=".", label=name)
    b.set_xlabel("fraction of pairs discarded (lowest quality first)")
    b.set_ylabel(f"FNMR at FMR={report['fmr']:g}")
    b.set_title(f"Error vs discard ({report['genuine_pairs']} genuine pairs)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(readme: Path, report: dict) -> None:
    kinds = list(report["spearman"])
    edc = report["edc"]
    lines = ["| | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|",
             "| Spearman(SER-FIQ, quality) | " + " | ".join(str(report["spearman"][k]) for k in kinds) + " |", "",
             f"FNMR at FMR {report['fmr']:g} ({report['genuine_pairs']} genuine, {report['impostor_pairs']} "
             "impostor pairs), with 0% / 20% / 40% of pairs discarded:", ""]
    for name, curve in edc.items():
        lines.append(f"- {name}: {curve[0][1]} / {curve[4][1]} / {curve[8][1]}")
    text = readme.read_text()
    start, end = "<!-- fiqa:start -->", "<!-- fiqa:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        readme.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    sys.exit(main())
