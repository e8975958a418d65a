#!/usr/bin/env python3
"""At what scale should the detector read a frame? Faces under `faces.min_face` source pixels are never scored,
so the detector only has to find faces of that size, and give them keypoints good enough to align them. The same
measures compare the default's 8-bit weights with float ones.

For every shared clip larger than `detect.min_size`, the default detector reads each sampled frame at a high
reference scale (its longer side at 1280 px, or the frame as it is) and at each candidate rule. Reported per rule:
- recall: the share of the reference's faces of at least `min_face` px that the rule also finds (IoU >= 0.5, both
  at the operating threshold);
- keypoint error: the distance between the rule's 5 points and the reference's, over the face's side (median and
  90th percentile); for the default rule also after `detect.refine_px` found them again on the face alone, as the
  pipeline does for every face it scores;
- the detector's milliseconds per frame on this machine, and its input size on a 1080p frame.

  python scripts/eval_detect_scale.py [--out docs/results/detect_scale.json] [--readme README.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("CAFI_MODEL_PATH", str(ROOT.parent / "shared" / "data" / "models" / "optional"))
sys.path.insert(0, str(ROOT))

from cafi_stream.analyse import FaceAnalysis  # noqa: E402
from cafi_stream.config import load_config  # noqa: E402
from cafi_stream.decode import VideoFrame  # noqa: E402
from cafi_stream.detect import input_scale, match_faces  # noqa: E402
from cafi_stream.models import default_models_dir  # noqa: E402
from readme_block import replace_block  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
REFERENCE = 1280
# name -> (longer-side cap, least longer side, face_px): the earlier fixed 640, and the min_face rule at 3 sizes
DEFAULT = "face_px 24 (default)"
FLOAT = "face_px 24, float weights (`detect.precision = fp32`)"
RULES = {"fixed 640 (before)": (640, 0, 0), "face_px 16": (640, 320, 16), DEFAULT: (640, 320, 24),
         "face_px 32": (640, 320, 32), FLOAT: (640, 320, 24)}


def clips(min_size: int) -> list[Path]:
    out = []
    for path in sorted((SHARED / "videos").glob("*.mp4")) + sorted((SHARED / "real" / "videos").iterdir()):
        with av.open(str(path)) as c:
            s = c.streams.video[0].codec_context
            if max(s.width, s.height) > min_size:
                out.append(path)
    return out


def evaluate(every: int, limit: int) -> dict:
    cfg = load_config()
    min_face = cfg.faces.min_face
    analysis = FaceAnalysis(cfg.detect, default_models_dir(), min_face=min_face)   # the pipeline's: it refines
    # The reference, and the float row, read with float weights whatever the default's precision.
    exact = FaceAnalysis(dataclasses.replace(cfg.detect, precision="fp32"), default_models_dir(), min_face=min_face)
    detector = analysis.detector
    result = {"min_face": min_face, "reference_longer_side": REFERENCE, "clips": {}, "rules": {}}
    stats = {name: {"found": 0, "errors": [], "seconds": 0.0} for name in RULES}
    refined: list[float] = []
    total = frames_seen = 0
    for clip in clips(cfg.detect.min_size):
        with av.open(str(clip)) as c:
            frames = [VideoFrame(i, 0.0, f) for i, f in enumerate(c.decode(video=0)) if i % every == 0][:limit]
        width, height = frames[0].size
        clip_faces = 0
        for frame in frames:
            frames_seen += 1
            s = min(1.0, REFERENCE / max(width, height))
            ref = exact.detector.detect([frame.scaled(s)], s)[0]
            ref = ref[ref.side >= min_face]
            total += len(ref)
            clip_faces += len(ref)
            for name, (size, least, face_px) in RULES.items():
                s = input_scale(width, height, size, least, face_px / min_face if face_px else np.inf)
                t0 = time.perf_counter()
                dets = (exact.detector if name == FLOAT else detector).detect([frame.scaled(s)], s)[0]
                stats[name]["seconds"] += time.perf_counter() - t0
                for i, j, err in match_faces(ref, dets):
                    stats[name]["found"] += 1
                    stats[name]["errors"].append(err)
                    if name == DEFAULT:
                        five = analysis.landmarks(frame, dets, j).five
                        refined.append(float(np.linalg.norm(ref.five[i] - five, axis=1).mean() / ref.side[i]))
        result["clips"][clip.name] = {"size": f"{width}x{height}", "frames": len(frames), "faces": clip_faces}
        print(clip.name, result["clips"][clip.name], file=sys.stderr)
    analysis.close()
    exact.close()
    result["precision"] = detector.precision
    result["faces"], result["frames"] = total, frames_seen
    result["refined_keypoint_error_median"] = round(float(np.median(refined)), 4)
    result["refined_keypoint_error_p90"] = round(float(np.percentile(refined, 90)), 4)
    for name, (size, least, face_px) in RULES.items():
        st = stats[name]
        s1080 = input_scale(1920, 1080, size, least, face_px / min_face if face_px else np.inf)
        result["rules"][name] = {
            "recall": round(st["found"] / max(1, total), 3),
            "keypoint_error_median": round(float(np.median(st["errors"])), 4) if st["errors"] else None,
            "keypoint_error_p90": round(float(np.percentile(st["errors"], 90)), 4) if st["errors"] else None,
            "ms_per_frame": round(1000 * st["seconds"] / frames_seen, 1),
            "input_at_1080p": f"{round(1920 * s1080)}x{round(1080 * s1080)}",
        }
    return result


def readme_table(r: dict) -> str:
    rows = [f"| rule | input at 1080p | recall of faces >= {r['min_face']} px | keypoint error / side, median | "
            "90th pct | detector ms per frame |", "|---|---|---|---|---|---|"]
    for name, v in r["rules"].items():
        rows.append(f"| {name} | {v['input_at_1080p']} | {v['recall']:.3f} | {v['keypoint_error_median']:.4f} | "
                    f"{v['keypoint_error_p90']:.4f} | {v['ms_per_frame']} |")
    d = r["rules"][DEFAULT]
    rows.append(f"| {DEFAULT}, keypoints refined (`detect.refine_px`) | {d['input_at_1080p']} | {d['recall']:.3f} | "
                f"{r['refined_keypoint_error_median']:.4f} | {r['refined_keypoint_error_p90']:.4f} | "
                "+ one call per scored face |")
    names = ", ".join(f"`{k}` ({v['size']})" for k, v in r["clips"].items())
    return "\n".join(rows) + (f"\n\n{r['faces']} reference faces in {r['frames']} frames of {names}; the reference "
                              f"reads each frame at {r['reference_longer_side']} px with float weights, the rules "
                              f"with the default's ({r['precision']}). "
                              "`python scripts/eval_detect_scale.py`.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "detect_scale.json")
    ap.add_argument("--readme", type=Path)
    ap.add_argument("--every", type=int, default=3, help="one frame in this many")
    ap.add_argument("--limit", type=int, default=40, help="frames per clip at most")
    args = ap.parse_args()
    result = evaluate(args.every, args.limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["rules"], indent=1))
    if args.readme:
        replace_block(args.readme, "detect-scale", readme_table(result))


if __name__ == "__main__":
    main()
