#!/usr/bin/env python3
"""Shot-cut detection on real video with known cuts and whole-frame quality changes; prints one JSON object.

The test sequence joins `--seconds` of each clip of ../shared/data/real/videos (each boundary is a hard cut) and,
inside each clip, changes the whole frame's quality every second the way a camera does: brightness and colour
(gain, colour cast), defocus, motion blur, sensor noise, JPEG starvation, low resolution. A perfect detector
finds every boundary and nothing else.

Clips are split in two by name: `fit` clips (the voxceleb2 clips at even positions in sorted order) are where
thresholds were chosen; `report` clips (every other clip) were never used for that. Both are reported.

    scripts/eval_cuts.py [--seconds 8] [--size 256] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import av
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cafi_stream import degrade  # noqa: E402
from cafi_stream.config import load_config  # noqa: E402
from cafi_stream.decode import VideoFrame  # noqa: E402
from cafi_stream.track import HistogramCutDetector, ShotCutDetector  # noqa: E402

SHARED = Path(os.environ.get("CAFI_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# The face detectors' files (SCRFD, YuNet) are read from the shared models, as a site's model store.
os.environ.setdefault("CAFI_MODEL_PATH", str(SHARED / "models" / "optional"))
VIDEOS = SHARED / "real" / "videos"


def split_clips() -> dict[str, list[Path]]:
    clips = sorted(p for p in VIDEOS.iterdir() if p.suffix in (".mp4", ".mov"))
    vox = [p for p in clips if p.name.startswith("voxceleb2_")]
    fit = vox[::2]
    return {"fit": fit, "report": [p for p in clips if p not in fit]}


def _cast(img: np.ndarray, level: int) -> np.ndarray:   # white balance drifting towards blue
    gains = np.array([1 - 0.1 * level, 1.0, 1 + 0.12 * level], np.float32)
    return np.clip(img.astype(np.float32) * gains, 0, 255).astype(np.uint8)


def _bright(img: np.ndarray, level: int) -> np.ndarray:   # auto-exposure jumping up
    return np.clip(img.astype(np.float32) * (1 + 0.25 * level), 0, 255).astype(np.uint8)


CHANGES = ["clean", "dark", "gauss", "noise", "jpeg", "bright", "motion", "downscale", "cast"]


def changed(img: np.ndarray, kind: str, level: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "bright":
        return _bright(img, level)
    if kind == "cast":
        return _cast(img, level)
    return degrade.apply(img, kind, level, rng)


def sequence(clips: list[Path], seconds: float, size: int, seed: int = 0):
    """Yields (frame, is_cut, seconds it lasts) over the joined clips; every second of a clip gets the next change in CHANGES."""
    rng = np.random.default_rng(seed)
    step = 0
    for n, clip in enumerate(clips):
        with av.open(str(clip)) as c:
            stream = c.streams.video[0]
            fps = float(stream.average_rate or 25)
            for i, frame in enumerate(c.decode(stream)):
                if i >= seconds * fps:
                    break
                if i % int(round(fps)) == 0:
                    kind, level = CHANGES[step % len(CHANGES)], 1 + step % 3
                    step += 1
                img = cv2.resize(frame.to_ndarray(format="rgb24"), (size, size), interpolation=cv2.INTER_AREA)
                yield changed(img, kind, level, rng), (i == 0 and n > 0), 1.0 / fps


def evaluate(detector, clips: list[Path], seconds: float, size: int) -> dict:
    false = missed = cuts = frames = 0
    duration = 0.0
    for img, is_cut, lasts in sequence(clips, seconds, size):
        found = detector(VideoFrame(0, 0.0, img).thumbnail)
        frames += 1
        duration += lasts
        cuts += is_cut
        false += found and not is_cut
        missed += is_cut and not found
    return {"frames": frames, "minutes": round(duration / 60, 2), "cuts": cuts, "false_cuts": false,
            "missed_cuts": missed, "false_cuts_per_minute": round(false / (duration / 60), 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0, help="seconds taken from each clip")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = {}
    for split, clips in split_clips().items():
        result[split] = {"clips": [c.name for c in clips],
                         "structure and colour (default)": evaluate(ShotCutDetector(load_config().track.shot_cut), clips, args.seconds, args.size),
                         "colour histogram (before)": evaluate(HistogramCutDetector(0.3), clips, args.seconds,
                                                               args.size)}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
