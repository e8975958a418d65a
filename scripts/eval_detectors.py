#!/usr/bin/env python3
"""Face detectors side by side on the shared real videos: recall by face size, speed on CPU, box calibration.

No video here has boxes drawn by hand, so the reference is agreement: a face counts when at least two of the three
detectors find it at a low threshold (0.3). A detector's recall is the share of those faces it finds at the
operating threshold (`detect.min_confidence`); faces that only one detector finds are counted apart (a miss of
the other two, or a false detection). Sizes are in mediapipe-equivalent box sides (the calibrated square box).

Speed is the mean time per frame of detection plus the landmarks of every face of at least `--min-face` pixels
(the mesh for mediapipe, the detector's own keypoints otherwise), at each clip's own resolution.

  python scripts/eval_detectors.py --out docs/results/detectors.json [--readme README.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cafi_stream.analyse import FaceAnalysis  # noqa: E402
from cafi_stream.config import load_config  # noqa: E402
from cafi_stream.detect import DETECTORS  # noqa: E402
from readme_block import replace_block  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
OPTIONAL = SHARED / "models" / "optional"
BINS = ((0, 64), (64, 112), (112, 10_000))
LOW = 0.3


def clips() -> list[Path]:
    return sorted((SHARED / "videos").glob("*.mp4")) + sorted(
        p for p in (SHARED / "real" / "videos").iterdir() if p.suffix in (".mp4", ".mov"))


def frames_of(path: Path, every: int, limit: int):
    with av.open(str(path)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i // every >= limit:
                return
            if i % every == 0:
                yield f.to_ndarray(format="rgb24")


FILES = {"scrfd_2.5g": OPTIONAL / "scrfd_2.5g_bnkps_640.onnx", "yunet": OPTIONAL / "face_detection_yunet_2026may.onnx"}
# Measured against the same reference faces, without a vote in it: the default detector with float weights.
FLOAT = "scrfd_2.5g (float weights)"
DETECTOR_OF = {FLOAT: "scrfd_2.5g"}   # a row's registry entry, where the row is not one


def analysers(min_confidence: float) -> dict[str, FaceAnalysis]:
    """The voting detectors in their default configuration, then FLOAT."""
    cfg = dataclasses.replace(load_config().detect, min_confidence=min_confidence)
    out = {name: FaceAnalysis(dataclasses.replace(cfg, model=str(FILES.get(name, name))), OPTIONAL)
           for name in DETECTORS}
    out[FLOAT] = FaceAnalysis(dataclasses.replace(cfg, model=str(FILES[DETECTOR_OF[FLOAT]]), precision="fp32"),
                              OPTIONAL)
    return out


def _match(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each box of `a`, the index of the box of `b` whose centre is within a third of a side, or -1."""
    out = np.full(len(a), -1)
    if not len(a) or not len(b):
        return out
    ca, cb = (a[:, :2] + a[:, 2:]) / 2, (b[:, :2] + b[:, 2:]) / 2
    side = np.maximum(a[:, 2] - a[:, 0], 1)[:, None]
    d = np.linalg.norm(ca[:, None] - cb[None], axis=2) / side
    best = d.argmin(1)
    ok = d[np.arange(len(a)), best] < 1 / 3
    out[ok] = best[ok]
    return out


def evaluate(every: int, limit: int, min_face: float, threshold: float) -> dict:
    low = analysers(LOW)
    names = list(low)
    voters = [n for n in names if n != FLOAT]
    found = {n: np.zeros(len(BINS)) for n in names}
    reference = np.zeros(len(BINS))
    alone = {n: 0 for n in voters}
    ratios = {n: [] for n in names}
    seconds = {n: 0.0 for n in names}
    frames = 0
    per_clip = {}
    for clip in clips():
        ref_clip, found_clip = 0, {n: 0 for n in names}
        for image in frames_of(clip, every, limit):
            frames += 1
            dets = {}
            for n in names:
                t0 = time.perf_counter()
                d = low[n](image)
                for i in np.flatnonzero((d.confidence >= threshold) & (d.side >= min_face)):
                    low[n].landmarks(image, d, int(i))
                seconds[n] += time.perf_counter() - t0
                dets[n] = d
            # Reference faces: the union of all boxes, kept where at least two detectors agree.
            pool = np.concatenate([dets[n].xyxy for n in voters])
            owner = np.concatenate([np.full(len(dets[n]), k) for k, n in enumerate(voters)])
            taken = np.zeros(len(pool), bool)
            for i in range(len(pool)):
                if taken[i]:
                    continue
                hits = {}
                for k, n in enumerate(voters):
                    j = _match(pool[i:i + 1], dets[n].xyxy)[0]
                    if j >= 0:
                        hits[n] = j
                        taken[np.flatnonzero(owner == k)[j]] = True
                if len(hits) < 2:
                    n = voters[owner[i]]
                    alone[n] += int(dets[n].confidence[hits[n]] >= threshold) if n in hits else 0
                    continue
                side = (dets["mediapipe"].side[hits["mediapipe"]] if "mediapipe" in hits
                        else float(np.median([dets[n].side[j] for n, j in hits.items()])))
                b = next(k for k, (lo, hi) in enumerate(BINS) if lo <= side < hi)
                reference[b] += 1
                j = _match(pool[i:i + 1], dets[FLOAT].xyxy)[0]
                if j >= 0:
                    hits[FLOAT] = j
                ref_clip += 1
                for n, j in hits.items():
                    if dets[n].confidence[j] >= threshold:
                        found[n][b] += 1
                        found_clip[n] += 1
                    if "mediapipe" in hits and n != "mediapipe":
                        ratios[n].append(dets["mediapipe"].side[hits["mediapipe"]] / dets[n].side[j])
        per_clip[clip.name] = {"reference_faces": ref_clip,
                               **{n: round(found_clip[n] / ref_clip, 3) if ref_clip else None for n in names}}
        print(clip.name, per_clip[clip.name], file=sys.stderr)
    for a in low.values():
        a.close()
    return {
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "frames": frames, "every": every, "threshold": threshold, "min_face": min_face,
        "bins": [f"{lo}-{hi}" if hi < 10_000 else f">={lo}" for lo, hi in BINS],
        "reference_faces": reference.astype(int).tolist(),
        "recall": {n: [round(f / r, 3) if r else None for f, r in zip(found[n], reference)] for n in names},
        "recall_all": {n: round(found[n].sum() / reference.sum(), 3) for n in names},
        "found_alone": alone,
        "ms_per_frame": {n: round(1000 * seconds[n] / frames, 1) for n in names},
        # mediapipe's side over this detector's, on the same faces: the factor that makes the two boxes agree
        "box_ratio_to_mediapipe": {n: round(float(np.median(r)), 3) for n, r in ratios.items() if r},
        "licence": {n: DETECTORS[DETECTOR_OF.get(n, n)].licence for n in names},
        "clips": per_clip,
    }


def readme_table(r: dict) -> str:
    rows = ["| detector | licence | recall, all | " + " | ".join(f"recall {b} px" for b in r["bins"])
            + " | found by it alone | ms per frame (CPU, 2 cores) |", "|---" * (5 + len(r["bins"])) + "|"]
    for n in r["recall"]:
        rows.append(f"| `{n}` | {r['licence'][n]} | {r['recall_all'][n]:.3f} | "
                    + " | ".join("-" if v is None else f"{v:.3f}" for v in r["recall"][n])
                    + f" | {r['found_alone'].get(n, '-')} | {r['ms_per_frame'][n]} |")
    return "\n".join(rows) + (f"\n\n{sum(r['reference_faces'])} reference faces in {r['frames']} frames "
                              f"(every {r['every']}th frame of each shared clip); `python scripts/eval_detectors.py`.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "detectors.json")
    ap.add_argument("--readme", type=Path)
    ap.add_argument("--every", type=int, default=10, help="one frame in this many")
    ap.add_argument("--limit", type=int, default=30, help="frames per clip at most")
    args = ap.parse_args()
    cfg = load_config()
    result = evaluate(args.every, args.limit, cfg.faces.min_face, cfg.detect.min_confidence)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("recall_all", "recall", "ms_per_frame", "box_ratio_to_mediapipe")}))
    if args.readme:
        replace_block(args.readme, "detectors", readme_table(result))


if __name__ == "__main__":
    main()
