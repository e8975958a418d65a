"""Stage 9: write kept faces (crops + metadata.jsonl rows) and summary.json, every file atomically."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np

from .errors import OutputError
from .outdir import (IMAGE_DIRS, LIVE_DIR, METADATA, SUMMARY, AppendOnly, OutputDir, atomic_write, image_name,
                     snapshot_name, writing)
from .rows import FaceRow, face_rows_text, rounded
from .select import KeptFace, TrackResult

log = logging.getLogger(__name__)


def encode_images(context: np.ndarray, aligned: np.ndarray, masked: np.ndarray, jpeg_quality: int = 95
                  ) -> dict[str, bytes]:
    """RGB crops -> encoded files (JPEG context crop, lossless aligned and masked crops)."""
    def enc(ext, img, params=()):
        ok, buf = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), list(params))
        if not ok:
            raise RuntimeError(f"cannot encode {ext} image")
        return buf.tobytes()

    return {"context": enc(".jpg", context, (cv2.IMWRITE_JPEG_QUALITY, jpeg_quality)),
            "aligned": enc(".png", aligned), "masked": enc(".png", masked)}


class OutputWriter:
    """Writes into a claimed `OutputDir`. `source` is the name to record (credentials already redacted)."""

    def __init__(self, out: OutputDir, source: str, iqa_name: str | None, jpeg_quality: int = 95):
        self.out = out
        self.out_dir = out.root
        self.jpeg_quality = jpeg_quality
        self.source = source
        self.iqa_name = iqa_name
        self.rows = 0
        self.tracks = 0
        self._snapshots: dict[int, set[str]] = {}
        for sub in [d for d, _, _ in IMAGE_DIRS.values()] + [LIVE_DIR]:
            out.subdir(sub)
        path = out.inside(METADATA)
        with writing(path):
            self._meta: AppendOnly | None = AppendOnly(path)

    def _rows(self, track_id: int, kept: list[KeptFace], live: bool, span: tuple[float, float],
              written: list[str]) -> list[FaceRow]:
        """Write the faces' images (once per file name, each name appended to `written` before its write) and
        return their metadata rows."""
        rows = []
        emb = np.stack([k.face.embedding for k in kept])
        sim = emb @ emb.T
        np.fill_diagonal(sim, -np.inf)
        for k, similarity in zip(kept, sim.max(axis=1)):
            f = k.face
            names = {kind: image_name(kind, track_id, f.frame_index, live) for kind in IMAGE_DIRS}
            if not (live and all((self.out_dir / n).exists() for n in names.values())):   # snapshots: once
                images = encode_images(f.crops.context, f.crops.aligned, f.crops.masked, self.jpeg_quality)
                for kind, name in names.items():
                    written.append(name)
                    atomic_write(self.out_dir / name, images[kind])
            rows.append(FaceRow(
                **{IMAGE_DIRS[kind][1]: name for kind, name in names.items()},
                source=self.source, track_id=track_id, rank=k.rank, frame_index=f.frame_index,
                pts_time=round(f.pts_time, 4), bbox=rounded(f.bbox), det_score=round(f.det_score, 4),
                landmarks=rounded(f.landmarks), serfiq=float(f.serfiq), iqa_model=self.iqa_name,
                iqa=None if f.iqa is None else float(f.iqa), quality=float(f.quality), score=float(f.score),
                sharpness=round(f.sharpness, 2), yaw=round(f.yaw, 3), pose=f.pose,
                capture=f.measures.as_dict() if f.measures is not None else None,
                typicality=None if f.typicality is None else round(f.typicality, 6),
                similarity=round(float(similarity), 4) if len(kept) > 1 else None,
                track_start=round(span[0], 4), track_end=round(span[1], 4), embedding=rounded(f.embedding, 6)))
        return rows

    @property
    def counts(self) -> dict[str, int]:
        return {"faces_kept": self.rows, "tracks_written": self.tracks}

    def deliver(self, result: TrackResult) -> list[FaceRow]:
        """An ended track's faces into metadata.jsonl, or an open one's snapshot into live/; the rows written."""
        if result.final:
            return self.write_track(result.track_id, list(result.faces), result.span)
        return self.write_snapshot(result.track_id, list(result.faces), result.span)

    def write_track(self, track_id: int, kept: list[KeptFace], span: tuple[float, float]) -> list[FaceRow]:
        """Images first, then the track's rows in one append, so no row ever names a missing file. `span` is the
        (first, last) time the track was seen. A failed write removes the track's images: no file without a row."""
        rows: list[FaceRow] = []
        if kept:
            written: list[str] = []
            try:
                with writing(self.out.given):
                    rows = self._rows(track_id, kept, False, span, written)
                    self._meta.append(face_rows_text(rows).encode())
            except OutputError:
                self._discard(written)
                raise
            self.rows += len(kept)
            self.tracks += 1
        self.drop_snapshot(track_id)
        return rows

    def _discard(self, names) -> None:
        for name in names:
            (self.out_dir / name).unlink(missing_ok=True)

    def write_snapshot(self, track_id: int, kept: list[KeptFace], span: tuple[float, float]) -> list[FaceRow]:
        """A still-open track's best-so-far: live/track_<id>.json (replaced atomically) and its images; images
        of the previous snapshot that it no longer names are removed after the switch."""
        if not kept:
            return []
        with writing(self.out.given):
            rows = self._rows(track_id, kept, True, span, [])
            atomic_write(self.out_dir / snapshot_name(track_id),
                         (json.dumps([row.to_json() for row in rows]) + "\n").encode())
        files = {name for row in rows for name in row.images}
        self._discard(self._snapshots.get(track_id, set()) - files)
        self._snapshots[track_id] = files
        return rows

    def drop_snapshot(self, track_id: int) -> None:
        files = self._snapshots.pop(track_id, None)
        if files is None:
            return
        (self.out_dir / snapshot_name(track_id)).unlink(missing_ok=True)
        self._discard(files)

    def write_summary(self, summary: dict) -> Path:
        path = self.out_dir / SUMMARY
        with writing(path):
            atomic_write(path, (json.dumps(summary, indent=2) + "\n").encode())
        return path

    def close(self) -> None:
        if self._meta is not None:
            self._meta.close()
            self._meta = None


class ScoresLog:
    """`--scores-out`: one JSON line per scored face (frame, track, box, every score, whether it was kept), written
    when its track ends, so that a user can see why a face was or was not chosen."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with writing(self.path):
            self._f = open(self.path, "w", encoding="utf-8")
        self._tracks: dict[int, dict[int, dict]] = {}
        self._faces: dict[int, dict[int, object]] = {}   # the latest version of each row's face

    def record(self, face) -> None:
        self._tracks.setdefault(face.track_id, {})[face.frame_index] = {
            "frame_index": face.frame_index, "pts_time": round(face.pts_time, 4), "track_id": face.track_id,
            "bbox": rounded(face.bbox), "det_score": round(face.det_score, 4), "sharpness": round(face.sharpness, 2),
            "yaw": round(face.yaw, 3), "serfiq": float(face.serfiq), "iqa": None, "quality": None,
            "typicality": None if face.typicality is None else round(face.typicality, 6),
            "capture": face.measures.as_dict() if face.measures is not None else None}
        self._faces.setdefault(face.track_id, {})[face.frame_index] = face

    def update(self, face) -> None:
        row = self._tracks.get(face.track_id, {}).get(face.frame_index)
        if row is not None:
            row["iqa"] = None if face.iqa is None else float(face.iqa)
            row["quality"] = float(face.quality)
            self._faces[face.track_id][face.frame_index] = face

    def close_track(self, track_id: int, kept: list[KeptFace], threshold: float, score) -> None:
        rows = self._tracks.pop(track_id, {})
        faces = self._faces.pop(track_id, {})
        ranks = {k.face.frame_index: k.rank for k in kept}
        lines = []
        for frame, row in sorted(rows.items()):
            row["passed_serfiq"] = row["serfiq"] >= threshold
            row["score"] = None if row["quality"] is None else float(score(faces[frame]))
            row["kept"] = frame in ranks
            row["rank"] = ranks.get(frame)
            lines.append(json.dumps(row) + "\n")
        with writing(self.path):
            self._f.write("".join(lines))
            self._f.flush()

    def close(self) -> None:
        self._f.close()
