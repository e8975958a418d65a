"""The library API: run the CAFI pipeline over one video source.

decode -> detect -> track -> landmarks/align -> SER-FIQ -> IQA -> per-track top-k -> write
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .align import crop_face
from .config import Config
from .decode import Decoder, VideoFrame
from .detect import FaceDetector
from .iqa import IqaModel, create_iqa, resolve_device
from .landmarks import FaceMesher
from .models import default_models_dir, resolve_fr_model, sha256_of
from .select import Selector, ScoredFace, SerfiqRule
from .serfiq import SerFiq
from .track import FaceTracker
from .writer import OutputWriter, encode_images

log = logging.getLogger(__name__)


class Stopwatch:
    """Seconds spent per stage."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0


@dataclass
class Models:
    """Everything loaded once and reusable across videos."""

    detector: FaceDetector
    mesher: FaceMesher
    serfiq: SerFiq
    iqa: IqaModel | None
    device: str
    files: dict[str, dict]   # role -> {name, path, sha256}

    @classmethod
    def load(cls, cfg: Config) -> "Models":
        device = resolve_device(cfg.runtime.device)
        models_dir = default_models_dir(cfg.runtime.models_dir)
        fr_path, fr_spec = resolve_fr_model(cfg.fr.model, models_dir)
        iqa = create_iqa(cfg.iqa.name, device, models_dir, cfg.iqa.dbcnn_dataset, cfg.iqa.batch)
        serfiq = SerFiq(fr_path, fr_spec, passes=cfg.serfiq.passes, dropout=cfg.serfiq.dropout,
                        seed=cfg.serfiq.seed, device=device, batch=cfg.serfiq.batch,
                        channel_order=cfg.fr.channel_order, mean=cfg.fr.mean, std=cfg.fr.std)
        import mediapipe

        mp_dir = Path(mediapipe.__file__).parent / "modules"
        files = {"face_recognition": (fr_spec.name, fr_path),
                 "face_detector": ("mediapipe face_detection full-range",
                                   mp_dir / "face_detection" / "face_detection_full_range_sparse.tflite"),
                 "face_mesh": ("mediapipe face_mesh", mp_dir / "face_landmark" / "face_landmark.tflite")}
        if iqa is not None and iqa.weights is not None:
            files["iqa"] = (iqa.name, iqa.weights)
        return cls(detector=FaceDetector(cfg.detect), mesher=FaceMesher(), serfiq=serfiq, iqa=iqa, device=device,
                   files={role: {"name": name, "path": str(path), "sha256": sha256_of(Path(path))}
                          for role, (name, path) in files.items() if Path(path).is_file()})

    def close(self) -> None:
        self.detector.close()
        self.mesher.close()


@dataclass
class RunResult:
    out_dir: Path
    summary: dict


def default_out_dir(source: str) -> Path:
    stem = Path(source.split("?")[0].rstrip("/")).stem or "stream"
    return Path("cafi_out") / re.sub(r"[^\w.-]+", "_", stem)


class _Run:
    """The state of one run over one source; `handle` is called once per decoded frame."""

    def __init__(self, cfg: Config, models: Models, decoder: Decoder, writer: OutputWriter):
        self.cfg = cfg
        self.models = models
        self.decoder = decoder
        self.writer = writer
        self.timer = Stopwatch()
        self.tracker = FaceTracker(cfg.track, decoder.info.fps)
        min_score = cfg.serfiq.min_score
        if min_score == "auto":
            min_score = models.serfiq.spec.serfiq_min
        self.selector = Selector(cfg.output.topk, cfg.output.min_gap,
                                 SerfiqRule(cfg.serfiq.track_quantile, min_score), cfg.runtime.pool_factor)
        self.counts: dict[str, int] = defaultdict(int)
        self.track_ids: set[int] = set()

    def _end_tracks(self, track_ids) -> None:
        for tid in track_ids:
            with self.timer("select"):
                kept = self.selector.close(tid)
            if self.tracker.is_real(tid):
                with self.timer("write"):
                    self.writer.write_track(tid, kept)

    def handle(self, frame: VideoFrame) -> None:
        cfg, m, timer = self.cfg, self.models, self.timer
        self.counts["frames"] += 1
        with timer("detect"):
            dets = m.detector(frame.image)
        self.counts["faces_detected"] += len(dets)
        with timer("track"):
            update = self.tracker.update(frame.image, dets)
        self._end_tracks(update.ended)
        self.track_ids.update(int(t) for t in update.track_ids if t >= 0)
        big = (update.track_ids >= 0) & (dets.side >= cfg.faces.min_face)
        self.counts["faces_too_small"] += int(np.sum(dets.side < cfg.faces.min_face))
        faces = []
        for i in np.flatnonzero(big):
            with timer("landmarks"):
                lm = m.mesher(frame.image, dets.xyxy[i])
            if lm is None:
                self.counts["landmark_failures"] += 1
                continue
            with timer("align"):
                crops = crop_face(frame.image, dets.xyxy[i], lm, cfg.faces.aligned_size, cfg.faces.iqa_size,
                                  cfg.output.context_scale)
            faces.append((i, lm, crops))
        if not faces:
            return
        with timer("serfiq"):
            sf = m.serfiq(np.stack([c.aligned for _, _, c in faces]))
        self.counts["faces_serfiq"] += len(faces)
        with timer("select"):
            passing = [j for j, (i, _, _) in enumerate(faces)
                       if self.selector.passes(int(update.track_ids[i]), float(sf.scores[j]))]
        iqa_values = {}
        if m.iqa is not None and passing:
            with timer("iqa"):
                values = m.iqa(np.stack([faces[j][2].masked for j in passing]))
            iqa_values = dict(zip(passing, values.tolist()))
            self.counts["faces_iqa"] += len(passing)
        for j in passing:
            i, lm, crops = faces[j]
            iqa = iqa_values.get(j)
            face = ScoredFace(
                track_id=int(update.track_ids[i]), frame_index=frame.index, pts_time=frame.pts_time,
                bbox=dets.xyxy[i], det_score=float(dets.confidence[i]), landmarks=lm.five,
                serfiq=float(sf.scores[j]), embedding=sf.embeddings[j], iqa=iqa,
                score=m.iqa.oriented(iqa) if iqa is not None else float(sf.scores[j]))
            with timer("select"):
                accepted = self.selector.offer(face)
            if accepted:   # encode only what the pool keeps
                with timer("write"):
                    face.images = encode_images(crops.context, crops.aligned, crops.masked,
                                                cfg.output.jpeg_quality)

    def finish(self) -> None:
        self._end_tracks(self.tracker.finish())
        self._end_tracks(self.selector.open_tracks)

    def summary(self, wall: float, interrupted: bool) -> dict:
        info = self.decoder.info
        seconds = {"decode": round(self.decoder.stats.seconds, 3)}
        seconds.update({k: round(v, 3) for k, v in self.timer.seconds.items()})
        seconds["processing"] = round(wall, 3)
        frames = self.counts["frames"]
        return {
            "version": __version__,
            "source": info.source,
            "video": {"width": info.width, "height": info.height, "fps": round(info.fps, 3), "codec": info.codec,
                      "declared_frames": info.frames, "declared_duration": info.duration},
            "frames": frames,
            "tracks": len(self.track_ids),
            "tracks_written": self.writer.tracks,
            "faces_kept": self.writer.rows,
            "faces": {k: self.counts[k] for k in ("faces_detected", "faces_too_small", "landmark_failures",
                                                   "faces_serfiq", "faces_iqa")},
            "shot_cuts": self.tracker.shot_cuts,
            "seconds": seconds,
            "fps": round(frames / wall, 2) if wall > 0 else None,
            "truncated": self.decoder.stats.truncated,
            "interrupted": interrupted,
            "device": self.models.device,
            "iqa": self.models.iqa.name if self.models.iqa else None,
            "models": self.models.files,
            "config": self.cfg.to_dict(),
        }


async def _consume(decoder: Decoder, handle, on_frame) -> None:
    loop = asyncio.get_running_loop()
    # One scoring thread: the event loop stays free while mediapipe, ONNX Runtime and torch work.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cafi-score") as pool:
        async for frame in decoder.frames():
            await loop.run_in_executor(pool, handle, frame)
            on_frame(frame)


def run(source: str, cfg: Config, out_dir: str | Path | None = None, models: Models | None = None,
        progress: bool = False) -> RunResult:
    """Process `source` and write its best faces into `out_dir` (default `cafi_out/<source stem>/`).

    Bad input raises InputError before any model loads. On KeyboardInterrupt every open track is still written,
    with the summary, before the interrupt propagates.
    """
    t0 = time.perf_counter()
    decoder = Decoder(source, cfg.decode.queue_size, cfg.decode.threads, cfg.decode.max_frames)
    own_models = models is None
    if own_models:
        models = Models.load(cfg)
    load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else default_out_dir(source)
    writer = OutputWriter(out, source, models.iqa.name if models.iqa else None)
    state = _Run(cfg, models, decoder, writer)
    total = cfg.decode.max_frames or decoder.info.frames
    if cfg.decode.max_frames and decoder.info.frames:
        total = min(total, decoder.info.frames)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="frame", dynamic_ncols=True, leave=False)
    interrupted = False
    try:
        asyncio.run(_consume(decoder, state.handle, (lambda f: bar.update(1)) if bar else (lambda f: None)))
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if bar is not None:
            bar.close()
        state.finish()
        writer.close()
        if decoder.stats.truncated:
            log.warning("%s: %s; kept what decoded", source, decoder.stats.truncated)
        summary = state.summary(time.perf_counter() - t0, interrupted)
        summary["seconds"]["load_models"] = round(load_seconds, 3)
        summary["out_dir"] = str(out)
        writer.write_summary(summary)
        if own_models:
            models.close()
    return RunResult(out_dir=out, summary=summary)
