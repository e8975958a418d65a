"""The metadata row of one kept face (`FaceRow`): the one schema that the writer writes, and that the dataset step,
identities, the report, batch and the scripts read. `metadata.jsonl` holds one row per line, as JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaceRow:
    file_name: str                 # the context crop: the image `datasets`' imagefolder loads
    aligned_file: str              # the 112x112 ArcFace crop
    masked_file: str               # the background-masked crop the IQA model judged
    source: str                    # the input, credentials redacted
    track_id: int
    rank: int                      # 1 = best, within its track (or identity, with --per identity)
    frame_index: int
    pts_time: float                # seconds
    bbox: tuple                    # square face box, x1 y1 x2 y2, source pixels
    det_score: float
    landmarks: tuple               # 5 (x, y) alignment points
    serfiq: float
    iqa_model: str | None
    iqa: float | None              # None: ranked without an IQA call (--iqa none, or the cascade's fallback)
    quality: float                 # the IQA value oriented so that higher is better (SER-FIQ without IQA)
    score: float                   # what the rank follows
    sharpness: float
    yaw: float
    pose: str                      # frontal | left | right
    capture: dict | None           # the capture measures (measures.CaptureMeasures)
    similarity: float | None       # largest embedding cosine to another kept face of its track
    track_start: float
    track_end: float
    embedding: tuple               # unit SER-FIQ embedding
    typicality: float | None = None   # cosine to its track's earlier faces' mean embedding (fusion.Centroids);
                                      # None for a track's first face, and in files written before it existed
    video: str | None = None       # a batch's video key (paths are then relative to the dataset)
    identity_id: int | None = None

    def to_json(self) -> dict:
        """The JSON object of its metadata line; `video` and `identity_id` only where set."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("video", "identity_id"):
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "FaceRow":
        """A row from its JSON object; keys it does not know are ignored (a newer writer's columns)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in obj.items() if k in names}
        for key in ("bbox", "landmarks", "embedding"):
            values[key] = _frozen(values[key])
        return cls(**values)

    @property
    def images(self) -> tuple[str, str, str]:
        return self.file_name, self.aligned_file, self.masked_file

    @property
    def track_key(self) -> tuple[str, int]:
        """A track's identity across a batch: (video, track_id)."""
        return self.video or "", self.track_id

    @property
    def got_iqa(self) -> bool:
        """Whether its quality is an IQA model's value (not SER-FIQ standing in for one)."""
        return self.iqa is not None

    def in_folder(self, prefix: str) -> "FaceRow":
        """The row with its image paths under `prefix` (a batch video's folder, relative to the dataset)."""
        return dataclasses.replace(self, file_name=f"{prefix}/{self.file_name}",
                                   aligned_file=f"{prefix}/{self.aligned_file}",
                                   masked_file=f"{prefix}/{self.masked_file}")


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def rounded(values, digits: int = 2) -> tuple:
    """Numbers as a row stores them (nested tuples of floats, `digits` decimals)."""
    return _frozen(np.round(np.asarray(values, np.float64), digits).tolist())


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file; a line cut short by a crash is skipped with a warning."""
    rows = []
    if not path.exists():
        return rows
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping an incomplete row", path, n)
    return rows


def read_face_rows(path: Path) -> list[FaceRow]:
    """The rows of a metadata file."""
    return [FaceRow.from_json(obj) for obj in read_jsonl(path)]


def face_rows_text(rows: list[FaceRow]) -> str:
    """Rows as metadata.jsonl lines."""
    return "".join(json.dumps(row.to_json()) + "\n" for row in rows)
