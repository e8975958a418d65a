#!/usr/bin/env python3
"""Does cafi-stream keep the right faces? Build test videos with known per-frame degradations, run the pipeline once
per ranker, and score what each kept.

    scripts/eval_selection.py --out DIR [--quick] [--seed 0] [--readme README.md]

The video is made from the real photos in ../shared/data/faces over a real (blurred) background from
../shared/data/videos: two people at a time drift across the frame for a few seconds, then a cut brings two
others. Each face in each frame is clean or degraded (Gaussian or motion blur, noise, JPEG, down-up scaling, low
light, a bar across the eyes, strong yaw) at a known level 1-3; the ground truth is DIR/ground_truth.json.

Each ranker (random, sharpness, detector, serfiq, and cafi with each fusion rule) runs the real pipeline with
--exhaustive (so every face gets every score) and --scores-out. Reported per ranker: the clean rate of the kept
top-k faces, the mean level of the degraded ones kept, and the within-track AUC (the chance that a clean face of a
track outranks a degraded one of the same track), per degradation kind too. Writes DIR/selection.json and
DIR/selection.png.
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
SHARED = Path(os.environ.get("CAFI_SHARED_DATA", ROOT.parent / "shared" / "data"))
# The face detectors' files (SCRFD, YuNet) are read from the shared models, as a site's model store.
os.environ.setdefault("CAFI_MODEL_PATH", str(SHARED / "models" / "optional"))
# The cards are cut around the faces this detector finds: fixed, so that they stay the same whichever detector
# the pipeline runs with.
CARD_DETECTOR = "mediapipe"

from cafi_stream import degrade  # noqa: E402

W, H, FPS = 960, 540, 30
PATCH = 240          # face patch side in the video (the face box is about half of it)
CLEAN_SHARE = 0.4    # share of clean face-frames
# The people this evaluation reports on. The fusion is never fitted on them: scripts/fit_fusion.py builds its cards
# from the other people of ../shared/data/real/faces.
PHOTOS = SHARED / "faces"

# Rankers: name -> config overrides. "cafi" is the default configuration's rule.
RANKERS = {
    "random": {"rank": {"method": "random"}},
    "sharpness": {"rank": {"method": "sharpness"}},
    "detector": {"rank": {"method": "detector"}},
    "serfiq": {"rank": {"method": "serfiq"}},
    "cafi": {},   # the default fusion ("learned": SER-FIQ, IQA and the capture measures, cafi_stream/fusion.json)
    "cafi_zmin": {"rank": {"fusion": "zmin"}},
    "cafi_filter_median": {"rank": {"fusion": "filter"}, "serfiq": {"track_quantile": 0.5}},
    "cafi_filter_absolute": {"rank": {"fusion": "filter"}, "serfiq": {"track_quantile": 0.0},
                             "_calibrate": True},
    "cafi_zsum": {"rank": {"fusion": "zsum"}},
}


def _faces(photos: Path) -> dict[str, np.ndarray]:
    """Square face patches (PATCH px, RGB) from the single-person photos in `photos`, centred on the detected
    face."""
    import cv2

    from cafi_stream.analyse import FaceAnalysis

    det = FaceAnalysis.configured(model=CARD_DETECTOR)
    out = {}
    for path in sorted(photos.iterdir()):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png") or path.name.startswith("multi_"):
            continue
        img = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        d = det(img)
        if not len(d):
            continue
        x1, y1, x2, y2 = d.xyxy[int(np.argmax(d.side))]
        side = (x2 - x1) * 1.9   # the patch holds the face with some head and background around it
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        scale = PATCH / side
        m = np.float32([[scale, 0, PATCH / 2 - cx * scale], [0, scale, PATCH / 2 - cy * scale]])
        out[path.stem] = cv2.warpAffine(img, m, (PATCH, PATCH), flags=cv2.INTER_AREA,
                                        borderMode=cv2.BORDER_REPLICATE)
    det.close()
    return out


def _backgrounds(n: int, rng) -> list[np.ndarray]:
    import av
    import cv2

    frames = []
    for video in sorted((SHARED / "videos").glob("*.mp4")):
        with av.open(str(video)) as c:
            for i, f in enumerate(c.decode(video=0)):
                if i % 40 == 0:
                    img = cv2.resize(f.to_ndarray(format="rgb24"), (W, H))
                    frames.append((cv2.GaussianBlur(img, (0, 0), 12) * 0.8).astype(np.uint8))
    return [frames[i] for i in rng.permutation(len(frames))[:n]]


def build_video(out_dir: Path, segments: int, seconds: float, seed: int, photos: Path = PHOTOS,
                name: str = "eval_video") -> tuple[Path, dict]:
    """The test video (`out_dir/<name>.mp4`) and its ground truth, with the people of `photos`."""
    import av

    rng = np.random.default_rng(seed)
    faces = _faces(photos)
    names = sorted(faces)
    backgrounds = _backgrounds(segments, rng)
    truth = {"fps": FPS, "size": [W, H], "segments": segments, "seconds_per_segment": seconds, "seed": seed,
             "kinds": list(degrade.KINDS), "faces": []}
    path = out_dir / f"{name}.mp4"
    per_seg = int(seconds * FPS)
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=FPS, options={"crf": "16", "preset": "veryfast"})
        st.width, st.height, st.pix_fmt = W, H, "yuv420p"
        frame_index = 0
        for seg in range(segments):
            people = rng.choice(len(names), size=2, replace=False)
            bg = backgrounds[seg % len(backgrounds)]
            # Each person drifts along a straight line in their half of the frame.
            paths = []
            for slot, p in enumerate(people):
                x0 = rng.uniform(40, W / 2 - PATCH - 20) + slot * W / 2
                y0 = rng.uniform(20, H - PATCH - 20)
                paths.append((names[p], x0, y0, rng.uniform(-40, 40), rng.uniform(-30, 30)))
            for k in range(per_seg):
                img = bg.copy()
                a = k / max(1, per_seg - 1)
                for name, x0, y0, dx, dy in paths:
                    x = int(np.clip(x0 + a * dx, 0, W - PATCH))
                    y = int(np.clip(y0 + a * dy, 0, H - PATCH))
                    if rng.random() < CLEAN_SHARE:
                        kind, level = "clean", 0
                    else:
                        kind, level = str(rng.choice(degrade.KINDS)), int(rng.integers(1, 4))
                    img[y:y + PATCH, x:x + PATCH] = degrade.apply(faces[name], kind, level, rng)
                    truth["faces"].append({"frame": frame_index, "identity": name.split("__")[0], "photo": name,
                                           "bbox": [x, y, x + PATCH, y + PATCH], "kind": kind, "level": level})
                for packet in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
                frame_index += 1
        for packet in st.encode():
            out.mux(packet)
    truth["frames"] = frame_index
    return path, truth


def truth_index(truth: dict) -> dict[int, list[dict]]:
    index: dict[int, list[dict]] = {}
    for f in truth["faces"]:
        index.setdefault(f["frame"], []).append(f)
    return index


def match(index: dict[int, list[dict]], frame: int, bbox) -> dict | None:
    """The ground-truth face whose patch holds the centre of `bbox` in `frame`."""
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    for f in index.get(frame, []):
        x1, y1, x2, y2 = f["bbox"]
        if x1 <= cx <= x2 and y1 <= cy <= y2:
            return f
    return None


def within_track_auc(rows: list[dict], index) -> tuple[float | None, dict[str, float]]:
    """P(a clean face outranks a degraded face of the same track); ties count half. Overall and per kind."""
    by_track: dict[int, list[tuple[tuple, dict]]] = {}
    for r in rows:
        gt = match(index, r["frame_index"], r["bbox"])
        if gt is None:
            continue
        key = (bool(r["passed_serfiq"]) and r["score"] is not None, r["score"] if r["score"] is not None else 0.0)
        by_track.setdefault(r["track_id"], []).append((key, gt))
    wins: dict[str, list[float]] = {}
    for faces in by_track.values():
        clean = [k for k, gt in faces if gt["kind"] == "clean"]
        for k, gt in faces:
            if gt["kind"] == "clean":
                continue
            for c in clean:
                wins.setdefault(gt["kind"], []).append(1.0 if c > k else 0.5 if c == k else 0.0)
    every = [w for ws in wins.values() for w in ws]
    return (float(np.mean(every)) if every else None), {k: round(float(np.mean(v)), 3) for k, v in sorted(wins.items())}


def calibrate_serfiq(models, quantile: float = 0.1) -> float:
    """An absolute SER-FIQ threshold for the model in use: the 10th percentile of its scores on the clean, aligned
    real photos (a face under it is less recognisable than 90% of clean faces)."""
    import cv2

    from cafi_stream.align import align_largest_face

    faces = []
    for path in sorted((SHARED / "faces").iterdir()):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png") and not path.name.startswith("multi_"):
            img = np.ascontiguousarray(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
            face = align_largest_face(img, models.faces)
            if face is not None:
                faces.append(face)
    threshold = float(np.quantile(models.serfiq(np.stack(faces)).scores, quantile))
    print(f"calibrated SER-FIQ threshold {threshold:.4f} on {len(faces)} clean photos", file=sys.stderr)
    return threshold


def evaluate(video: Path, truth: dict, out_dir: Path, rankers: dict, topk: int, min_gap: float) -> dict:
    from cafi_stream.config import load_config
    from cafi_stream.pipeline import Models, run
    from cafi_stream.rows import read_face_rows

    base = {"iqa": {"name": "piqe"}, "fr": {"model": str(SHARED / "models" / "mobilefacenet_paddlex_128d.onnx")},
            "output": {"topk": topk, "min_gap": min_gap}, "cascade": {"exhaustive": True}}
    models = Models.load(load_config(overrides=base))
    index = truth_index(truth)
    results = {}
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    for name, overrides in rankers.items():
        merged = {k: dict(v) for k, v in base.items()}
        for section, values in overrides.items():
            if section == "_calibrate":
                merged.setdefault("serfiq", {})["min_score"] = calibrate_serfiq(models)
                continue
            merged.setdefault(section, {}).update(values)
        cfg = load_config(overrides=merged)
        t0 = time.perf_counter()
        res = run(str(video), cfg, out_dir=out_dir / "runs" / name, models=models,
                  scores_out=out_dir / "runs" / f"{name}.scores.jsonl", overwrite=True)   # our own scratch runs
        kept = read_face_rows(res.out_dir / "metadata.jsonl")
        scored = [json.loads(line) for line in (out_dir / "runs" / f"{name}.scores.jsonl").read_text().splitlines()]
        matched = [g for g in (match(index, r.frame_index, r.bbox) for r in kept) if g is not None]
        degraded = [g for g in matched if g["kind"] != "clean"]
        auc, auc_kind = within_track_auc(scored, index)
        results[name] = {
            "serfiq_min_score": cfg.serfiq.min_score if name == "cafi_filter_absolute" else None,
            "clean_rate": round(1 - len(degraded) / len(matched), 3) if matched else None,
            "auc": None if auc is None else round(auc, 3),
            "mean_degraded_level": round(float(np.mean([g["level"] for g in degraded])), 2) if degraded else 0.0,
            "kept": len(kept), "kept_matched": len(matched),
            "kept_degraded_by_kind": {k: sum(g["kind"] == k for g in degraded) for k in degrade.KINDS},
            "auc_by_kind": auc_kind,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"{name:22s} clean rate {results[name]['clean_rate']}  AUC {results[name]['auc']}", file=sys.stderr)
    models.close()
    return results


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [results[n]["clean_rate"] or 0 for n in names], 0.4, label="top-k clean rate")
    ax.bar(x + 0.2, [results[n]["auc"] or 0 for n in names], 0.4, label="within-track AUC")
    ax.set_xticks(x, names, rotation=25, ha="right")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.legend(loc="lower right")
    ax.set_title("Which faces each ranker keeps (IQA: PIQE; DBCNN weights unavailable offline)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(readme: Path, results: dict, truth: dict) -> None:
    lines = ["| ranker | top-k clean rate | within-track AUC | mean level of degraded kept |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| `{name}` | {r['clean_rate']} | {r['auc']} | {r['mean_degraded_level']} |")
    lines.append("")
    lines.append(f"{truth['frames']} frames, {truth['segments']} shots of two people, "
                 f"{len(truth['faces'])} face-frames, {CLEAN_SHARE:.0%} clean.")
    text = readme.read_text()
    start, end = "<!-- selection:start -->", "<!-- selection:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        readme.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="a short video (under 3 minutes in all)")
    p.add_argument("--segments", type=int)
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per shot")
    p.add_argument("--rankers", help="comma-separated subset of " + ",".join(RANKERS))
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--min-gap", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--readme", help="rewrite the results table between <!-- selection:start/end --> in this file")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    segments = args.segments or (3 if args.quick else 8)
    seconds = 4.0 if args.quick and args.seconds == 5.0 else args.seconds
    names = args.rankers.split(",") if args.rankers else (
        ["random", "sharpness", "detector", "serfiq", "cafi"] if args.quick else list(RANKERS))
    rankers = {k: RANKERS[k] for k in names}
    t0 = time.perf_counter()
    video, truth = build_video(out, segments, seconds, args.seed)
    (out / "ground_truth.json").write_text(json.dumps(truth))
    results = evaluate(video, truth, out, rankers, args.topk, args.min_gap)
    report = {"rankers": results, "video": {k: v for k, v in truth.items() if k != "faces"},
              "topk": args.topk, "min_gap": args.min_gap, "iqa": "piqe",
              "note": "cafi rows use pyiqa PIQE as the IQA model: DBCNN's weights cannot be downloaded here, and "
                      "random-init DBCNN output is not a quality measure.",
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "selection.json").write_text(json.dumps(report, indent=2))
    chart(results, out / "selection.png")
    if args.readme:
        update_readme(Path(args.readme), results, truth)
    print(json.dumps({k: {m: v[m] for m in ("clean_rate", "auc")} for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
