import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAFI_SHARED_DATA", ROOT.parent / "shared" / "data"))
VIDEO = SHARED / "videos" / "short_hamilton_clip.mp4"
FR_MODEL = SHARED / "models" / "mobilefacenet_paddlex_128d.onnx"
FACES = SHARED / "faces"


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
    from cafi_stream.config import load_config
    from cafi_stream.detect import FaceDetector
    from cafi_stream.landmarks import FaceMesher

    det, mesh = FaceDetector(load_config().detect), FaceMesher()
    out = {}
    for path in sorted(FACES.iterdir()):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png") and not path.name.startswith("multi_"):
            face = align_largest_face(read_rgb(path), det, mesh)
            if face is not None:
                out[path.stem] = face
    det.close()
    mesh.close()
    return out


def read_rgb(path: Path) -> np.ndarray:
    import cv2

    return np.ascontiguousarray(cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
