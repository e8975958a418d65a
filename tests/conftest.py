import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Resolved: batch runs name their sources by real path, and ../shared may be a symbolic link.
SHARED = Path(os.environ.get("CAFI_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()
VIDEO = SHARED / "videos" / "short_hamilton_clip.mp4"
FR_MODEL = SHARED / "models" / "mobilefacenet_paddlex_128d.onnx"
FACES = SHARED / "faces"
OPTIONAL_MODELS = SHARED / "models" / "optional"
# The face detectors' files (SCRFD, YuNet) are found there, as a site's shared model store, by every run and CLI.
os.environ["CAFI_MODEL_PATH"] = str(OPTIONAL_MODELS)


def pytest_collection_modifyitems(config, items):
    if not SHARED.is_dir():
        skip = pytest.mark.skip(reason=f"shared test data not found at {SHARED} (set CAFI_SHARED_DATA)")
        for item in items:
            item.add_marker(skip)


def run_cli(*args, env=None, timeout=600):
    """The real CLI in a subprocess, as a user runs it."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "cafi_stream.cli", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=ROOT)


def read_rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def hamilton_run(tmp_path_factory):
    """The acceptance command, once per session: --topk 3 --iqa none with the shared MobileFaceNet."""
    out = tmp_path_factory.mktemp("hamilton")
    proc = run_cli(VIDEO, "--topk", 3, "--iqa", "none", "--fr-model", FR_MODEL, "--out", out, "--quiet")
    return proc, out


@pytest.fixture(scope="session")
def aligned_photos():
    """Single-person photos of ../shared/data/faces, detected, landmarked and aligned to 112x112 RGB."""
    from cafi_stream.align import align_largest_face

    faces = face_analysis()
    out = {}
    for path in sorted(FACES.iterdir()):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png") and not path.name.startswith("multi_"):
            face = align_largest_face(read_rgb(path), faces)
            if face is not None:
                out[path.stem] = face
    faces.close()
    return out


def face_analysis(**detect):
    """The configured face analysis (detector and landmarks), with `detect` overriding [detect] keys."""
    from cafi_stream.analyse import FaceAnalysis

    return FaceAnalysis.configured(**detect)


def read_rgb(path: Path) -> np.ndarray:
    import cv2

    return np.ascontiguousarray(cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))


def looped_copy(src: Path, dst: Path, times: int) -> Path:
    """`src` played `times` times in one file: its video packets remuxed with shifted timestamps (no re-encode)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        ist = inp.streams.video[0]
        ost = out.add_stream_from_template(ist)
        offset = 0
        for _ in range(times):
            inp.seek(0)
            last = 0
            for pkt in inp.demux(ist):
                if pkt.dts is None:
                    continue
                last = max(last, pkt.pts + (pkt.duration or 0))
                pkt.pts += offset
                pkt.dts += offset
                pkt.stream = ost
                out.mux(pkt)
            offset += last
    return dst


def still_video(photo: Path, dst: Path, seconds: float = 2.0, fps: int = 10) -> Path:
    """A 640x360 H.264 video of one photo (letterboxed), for identity tests across videos."""
    import av
    import cv2

    img = read_rgb(photo)
    scale = min(640 / img.shape[1], 360 / img.shape[0])
    small = cv2.resize(img, (int(img.shape[1] * scale) // 2 * 2, int(img.shape[0] * scale) // 2 * 2),
                       interpolation=cv2.INTER_AREA)
    frame = np.zeros((360, 640, 3), np.uint8)
    y, x = (360 - small.shape[0]) // 2, (640 - small.shape[1]) // 2
    frame[y:y + small.shape[0], x:x + small.shape[1]] = small
    with av.open(str(dst), "w") as out:
        st = out.add_stream("libx264", rate=fps, options={"crf": "18"})
        st.width, st.height, st.pix_fmt = 640, 360, "yuv420p"
        for _ in range(int(seconds * fps)):
            out.mux(st.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(st.encode())
    return dst
