"""The library API: run the CAFI pipeline over one video source.

decode -> detect -> track -> landmarks/align -> SER-FIQ -> IQA -> per-track top-k -> write
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import __version__
from .config import Config
from .dataset import finalize as finalize_output
from .decode import Decoder, VideoFrame
from .analyse import Analyser, FaceAnalysis, nothing_kept
from .backend import resolve_device
from .errors import OutputError
from .iqa import IqaModel, create_iqa
from .live import LiveDecoder, LiveOptions
from .models import default_models_dir, resolve_fr_model, sha256_of
from .outdir import METADATA, OutputDir, atomic_write, check_output_file, writing
from .rows import read_face_rows
from .scoring import Scoring
from .select import TrackResult
from .serfiq import SerFiq
from .sources import is_live, redact, source_stem
from .writer import OutputWriter

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

    faces: FaceAnalysis
    serfiq: SerFiq
    iqa: IqaModel | None
    device: str
    files: dict[str, dict]   # role -> {name, path, sha256}

    @classmethod
    def load(cls, cfg: Config, random_dbcnn: bool = False) -> "Models":
        device = resolve_device(cfg.runtime.device)
        models_dir = default_models_dir(cfg.runtime.models_dir)
        fr_path, fr_spec = resolve_fr_model(cfg.fr.model, models_dir)
        # The recognition model first: it is the one a user most often points at a wrong file, and checking it
        # takes a second where the IQA model takes many.
        serfiq = SerFiq(fr_path, fr_spec, passes=cfg.serfiq.passes, dropout=cfg.serfiq.dropout,
                        seed=cfg.serfiq.seed, device=device, batch=cfg.runtime.max_batch,
                        channel_order=cfg.fr.channel_order, mean=cfg.fr.mean, std=cfg.fr.std,
                        backend=cfg.runtime.backend)
        iqa = create_iqa(cfg.iqa.name, device, models_dir, cfg.iqa.dbcnn_dataset, cfg.iqa.batch,
                         backend=cfg.runtime.backend, random_weights=random_dbcnn, size=cfg.faces.iqa_size)
        faces = FaceAnalysis(cfg.detect, models_dir, device, cfg.runtime.backend, cfg.faces.min_face)
        files = {"face_recognition": (fr_spec.name, fr_path), **faces.files}
        if iqa is not None and iqa.weights is not None:
            files["iqa"] = (iqa.name, iqa.weights)
        return cls(faces=faces, serfiq=serfiq, iqa=iqa, device=device,
                   files={role: {"name": name, "path": str(path), "sha256": sha256_of(Path(path))}
                          for role, (name, path) in files.items() if Path(path).is_file()})

    @property
    def engines(self) -> dict[str, str]:
        out = {"face_detector": self.faces.name, "face_detector_backend": self.faces.detector.backend,
               # the weights that ran: "int8" may fall back to float (detect.ScrfdDetector._int8)
               "face_detector_precision": self.faces.detector.precision,
               "fr_backbone": f"{self.serfiq.engine.backend}/{self.serfiq.engine.device}"}
        if self.iqa is not None:
            out["iqa"] = f"{self.iqa.engine.backend}/{self.iqa.engine.device}"
        return out

    def close(self) -> None:
        self.faces.close()


@dataclass
class RunResult:
    out_dir: Path
    summary: dict


@dataclass(frozen=True)
class RunHooks:
    """What a caller of `run()` that serves results as they come (`serve`) plugs in: `on_result(result, rows)`
    after each track result is written (rows as written, `rows.FaceRow`), `on_frame(frame)` after each frame,
    and `stop`, an event that ends the run as SIGINT does (intake stops, every open track is written)."""

    on_result: Callable[[TrackResult, list], None] | None = None
    on_frame: Callable[[VideoFrame], None] | None = None
    stop: threading.Event | None = None


def default_out_dir(source: str) -> Path:
    return Path("cafi_out") / source_stem(source)


class Snapshots:
    """Tracks that never end (someone standing in view) give their best-so-far every `interval` seconds (0:
    never), once they have been open that long."""

    def __init__(self, interval: float):
        self.interval = interval
        self.opened: dict[int, float] = {}   # open track -> time of its first scored face
        self.last = 0.0

    def scored(self, track_id: int, pts: float) -> None:
        self.opened.setdefault(track_id, pts)

    def closed(self, track_id: int) -> None:
        self.opened.pop(track_id, None)

    def due(self, now: float, spans, peek) -> list[TrackResult]:
        """The snapshots due at `now`: each old enough track's span (`spans`, where known) and `peek(track)`."""
        if self.interval <= 0 or now - self.last < self.interval:
            return []
        self.last = now
        return [TrackResult(tid, spans.get(tid, (since, now)), tuple(peek(tid)), False)
                for tid, since in self.opened.items() if now - since >= self.interval]


class _Run:
    """The state of one run over one source; `handle` is called once per decoded frame: analysis (detect, track,
    gate, crops; `Analyser`) -> scoring (SER-FIQ, IQA, top-k pools; `Scoring`) -> each ended real track's
    `TrackResult`, and on live sources snapshots of open tracks."""

    def __init__(self, cfg: Config, models: Models, decoder: Decoder, scores_out: Path | None = None):
        self.cfg = cfg
        self.models = models
        self.decoder = decoder
        self.timer = Stopwatch()
        self.live = isinstance(decoder, LiveDecoder)
        self.analyser = Analyser(cfg, models.faces, decoder.info.fps, self.timer, self.live)
        self.scoring = Scoring(cfg, models.serfiq, models.iqa, self.timer, self.live, scores_out)
        self.snapshots = Snapshots(cfg.live.snapshot_interval)
        self.now = 0.0

    def _end_tracks(self, tracks) -> list[TrackResult]:
        """Each ended track's pool closed; the result of each real face's track."""
        results = []
        for track in tracks:
            kept = self.scoring.close(track.track_id, self.now)
            self.snapshots.closed(track.track_id)
            if track.real:
                results.append(TrackResult(track.track_id, track.span, tuple(kept)))
        return results

    def handle(self, frame: VideoFrame) -> list[TrackResult]:
        self.now = frame.pts_time
        analysed = self.analyser(frame)
        results = self._end_tracks(analysed.ended)
        for face in analysed.faces:
            self.snapshots.scored(face.track_id, face.pts_time)
        self.scoring.submit(analysed.faces, self.now)
        if not frame.index % self.analyser.stride:   # snapshots on detection frames
            results += self.snapshots.due(frame.pts_time, self.analyser.span, self.scoring.peek)
        return results

    def health(self) -> dict:
        """Figures for the status line and --stats-json."""
        stats = self.decoder.stats
        return {"frames_in": stats.frames, "processed": self.analyser.counts["frames"], "dropped": stats.dropped,
                "queue": getattr(self.decoder, "queue_depth", 0), "open_tracks": len(self.scoring.open_tracks),
                "reconnects": getattr(stats, "reconnects", 0), "connected": getattr(stats, "connected", True)}

    def finish(self) -> list[TrackResult]:
        """The results of every open track (end of input)."""
        results = self._end_tracks(self.analyser.finish(self.now))
        self.scoring.finish(self.now)
        return results


def run_summary(state: _Run, writer: OutputWriter, wall: float, interrupted: bool) -> dict:
    """summary.json's figures of a finished run."""
    info = state.decoder.info
    rotation = state.decoder.stats.rotation
    width, height = (info.height, info.width) if rotation % 180 else (info.width, info.height)
    seconds = {"decode": round(state.decoder.stats.seconds, 3)}
    seconds.update({k: round(v, 3) for k, v in state.timer.seconds.items()})
    seconds["processing"] = round(wall, 3)
    a = state.analyser
    frames = a.counts["frames"]
    faces = {k: v for k, v in sorted(a.counts.items()) if k != "frames"}
    faces.update(state.scoring.counts)
    return {
        "version": __version__,
        "source": info.source,
        "video": {"width": width, "height": height, "rotation": rotation, "fps": round(info.fps, 3),
                  "codec": info.codec, "declared_frames": info.frames, "declared_duration": info.duration},
        "frames": frames,
        "tracks": a.tracker.tracks_started,
        "tracks_written": writer.tracks,
        "faces_kept": writer.rows,
        "faces": faces,
        "shot_cuts": a.tracker.shot_cuts,
        "shot_cut_frames": list(a.cut_frames),
        "detection_stride": a.stride,
        "detection_frames_per_call": a.full_frame.ahead,   # detect.ahead as it ran
        "seconds": seconds,
        "fps": round(frames / wall, 2) if wall > 0 else None,
        "truncated": state.decoder.stats.truncated,
        "live": {**state.health(), **writer.counts} if state.live else None,
        "interrupted": interrupted,
        "device": state.models.device,
        "engines": state.models.engines,
        "iqa": state.scoring.iqa.name if state.scoring.iqa else None,
        "ranker": state.scoring.method,
        "models": state.models.files,
        "config": state.cfg.to_dict(),
    }


class StatusReporter:
    """Every `interval` seconds, in its own thread: `health()` with the rates since the last report, passed to
    `emit` and kept in `stats_json`."""

    def __init__(self, health, interval: float, emit=None, stats_json: Path | None = None):
        self.health, self.interval, self.emit, self.stats_json = health, interval, emit, stats_json
        self._last = (time.monotonic(), 0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cafi-status", daemon=True)

    def report(self) -> dict:
        now = time.monotonic()
        h = self.health()
        t, frames_in, processed = self._last
        dt = max(1e-6, now - t)
        h["input_fps"] = round((h["frames_in"] - frames_in) / dt, 2)
        h["processed_fps"] = round((h["processed"] - processed) / dt, 2)
        self._last = (now, h["frames_in"], h["processed"])
        if self.stats_json is not None:
            with writing(self.stats_json):
                atomic_write(self.stats_json, (json.dumps(h) + "\n").encode())
        if self.emit is not None:
            self.emit(h)
        return h

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.report()
            except OutputError as e:   # the run itself reports failed writes; the status line goes on
                log.warning("%s", e)

    def __enter__(self) -> "StatusReporter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _Signals:
    """First SIGINT/SIGTERM: stop intake, score what is queued, write every open track. Second SIGINT: exit now
    (every file already written is complete: all writes are atomic). Installed in the main thread only."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.stopping = False
        self._previous: dict[int, object] = {}

    def __call__(self, signum: int, _frame=None) -> None:
        if self.stopping and signum == signal.SIGINT:
            os._exit(130)
        if not self.stopping:
            log.warning("stopping (%s): finishing queued frames and writing open tracks; Ctrl-C again quits now",
                        signal.Signals(signum).name)
        self.stopping = True
        self.decoder.stop()

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def frame_results(state: _Run, max_frames: int = 0, on_frame=None) -> Iterator[TrackResult]:
    """The results the decoder's frames give, until the frames end or `max_frames` (0: no limit) were handled; the
    open tracks' results are `state.finish()`'s, so that a consumer can take them after an error too."""
    a = state.analyser
    frames = state.decoder.frames(a.prepare, held=a.full_frame.held)
    with contextlib.closing(frames):
        for handled, frame in enumerate(a.full_frame.frames(frames), 1):
            yield from state.handle(frame)
            if on_frame is not None:
                on_frame(frame)
            if handled == max_frames:
                return


def open_source(source: str, cfg: Config, stop: threading.Event | None = None):
    """A file decoder, or a live one for stream URLs, capture devices and `live.loop` files; `stop`, a caller's
    event, stops either (a live one's first connection attempts too: a camera whose server is down at start)."""
    if is_live(source) or cfg.live.loop:
        lv = cfg.live
        opts = LiveOptions(transport=lv.transport, open_timeout=lv.open_timeout, read_timeout=lv.read_timeout,
                           reconnect_max=lv.reconnect_max, backoff_initial=lv.backoff_initial,
                           backoff_max=lv.backoff_max, loop=lv.loop)
        return LiveDecoder(source, lv.queue_size, decode_threads(cfg), opts, stop)
    return Decoder(source, cfg.decode.queue_size, decode_threads(cfg), stop)


def decode_threads(cfg: Config) -> int:
    """`decode.threads`, where 0 leaves the stages' thread a core of its own."""
    return cfg.decode.threads or max(1, (os.cpu_count() or 1) - 1)


def process(source: str, cfg: Config, models: Models | None = None, random_dbcnn: bool = False
            ) -> Iterator[TrackResult]:
    """The pipeline as a lazy iterator: each track's kept faces (`TrackResult`) as soon as the track ends, and on
    live sources snapshots of open tracks; then, when the input ends, every open track's. Nothing is written:
    `run()` consumes the same results (`frame_results`, then `finish`) and writes them. Bad input raises
    InputError at the first step, before any model loads."""
    decoder = open_source(source, cfg)
    own_models = models is None
    if own_models:
        models = Models.load(cfg, random_dbcnn=random_dbcnn)
    try:
        state = _Run(cfg, models, decoder)
        yield from frame_results(state, cfg.decode.max_frames)
        yield from state.finish()
    finally:
        if own_models:
            models.close()


def run(source: str, cfg: Config, out_dir: str | Path | None = None, models: Models | None = None,
        progress: bool = False, random_dbcnn: bool = False, on_status=None,
        stats_json: str | Path | None = None, scores_out: str | Path | None = None, finalize: bool = True,
        exports: tuple[str, ...] = (), overwrite: bool = False, hooks: RunHooks | None = None) -> RunResult:
    """Process `source` and write its best faces into `out_dir` (default `cafi_out/<source stem>/`).

    Bad input (the source, the output paths) raises InputError before any model loads; a non-empty `out_dir` is
    refused unless `overwrite`, which then replaces only an earlier run's files. SIGINT/SIGTERM (in the main
    thread) stop intake and finish cleanly; on any other exit every open track is still written, with the
    summary, before the error propagates. A failed write raises OutputError after a summary that records it.
    `on_status(dict)` is called every `live.status_interval` seconds for live sources (and `stats_json` rewritten).
    `finalize` clusters the written faces into identities and writes report.html and `exports` (a batch does that
    once over all its videos instead). `hooks` (RunHooks) see each written result and frame, and can stop the run.
    """
    t0 = time.perf_counter()
    out = OutputDir(out_dir if out_dir is not None else default_out_dir(source))
    out.check(overwrite)
    for path, flag in ((scores_out, "--scores-out"), (stats_json, "--stats-json")):
        if path is not None:
            check_output_file(path, flag)
    decoder = open_source(source, cfg, hooks.stop if hooks is not None else None)
    own_models = models is None
    if own_models:
        models = Models.load(cfg, random_dbcnn=random_dbcnn)
    try:
        out.claim(overwrite)   # only now, so that a failure above leaves an earlier run untouched
        try:
            return _run_claimed(decoder, cfg, models, out, t0, progress, on_status, stats_json, scores_out,
                                finalize, exports, hooks or RunHooks())
        finally:
            out.release()
    finally:
        if own_models:
            models.close()


def _run_claimed(decoder, cfg: Config, models: Models, out: OutputDir, t0: float, progress: bool, on_status,
                 stats_json, scores_out, finalize: bool, exports: tuple[str, ...], hooks: RunHooks) -> RunResult:
    name = decoder.info.source   # credentials redacted
    iqa_name = models.iqa.name if models.iqa is not None and cfg.rank.method == "cafi" else None
    writer = OutputWriter(out, name, iqa_name, cfg.output.jpeg_quality)
    state = _Run(cfg, models, decoder, Path(scores_out) if scores_out is not None else None)
    load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    live = state.live
    reporter = None
    if live or stats_json is not None:
        reporter = StatusReporter(lambda: {**state.health(), **writer.counts}, cfg.live.status_interval,
                                  on_status if live else None, Path(stats_json) if stats_json is not None else None)
    bar = None
    if progress and not live:
        from tqdm import tqdm

        total = cfg.decode.max_frames or decoder.info.frames
        if cfg.decode.max_frames and decoder.info.frames:
            total = min(total, decoder.info.frames)
        bar = tqdm(total=total, unit="frame", dynamic_ncols=True, leave=False)
    signals = _Signals(decoder)
    frame_hooks = [h for h in ((lambda f: bar.update(1)) if bar else None, hooks.on_frame) if h is not None]

    def deliver(result: TrackResult) -> None:
        rows = writer.deliver(result)
        if hooks.on_result is not None:
            hooks.on_result(result, rows)

    interrupted = False
    error: BaseException | None = None
    try:
        with signals, reporter if reporter is not None else contextlib.nullcontext():
            for result in frame_results(state, cfg.decode.max_frames,
                                        (lambda f: [h(f) for h in frame_hooks]) if frame_hooks else None):
                with state.timer("write"):
                    deliver(result)
    except KeyboardInterrupt:
        interrupted = True
        raise
    except BaseException as e:
        error = e
        raise
    finally:
        if bar is not None:
            bar.close()
        # After a failed write, writing more would only fail again: the summary alone records the failure.
        failed = error if isinstance(error, OutputError) else None
        rows = None
        try:
            if failed is None:
                for result in state.finish():
                    deliver(result)
            writer.close()
            if failed is None and finalize:
                rows = finalize_output(out, read_face_rows(out.root / METADATA), cfg, exports, title=name, prune=True)
        except OutputError as e:
            failed = failed or e
        if decoder.stats.truncated:
            log.warning("%s: %s; kept what decoded", name, decoder.stats.truncated)
        stopped = signals.stopping or (hooks.stop is not None and hooks.stop.is_set())
        summary = run_summary(state, writer, time.perf_counter() - t0, interrupted or stopped)
        summary["seconds"]["load_models"] = round(load_seconds, 3)
        summary["out_dir"] = str(out)
        reason = failed or (error if not isinstance(error, (KeyboardInterrupt, type(None))) else None)
        summary["failed"] = reason is not None
        summary["error"] = redact(str(reason)) if reason is not None else None
        if rows is not None:
            summary["faces_kept"] = len(rows)
            summary["identities"] = len({r.identity_id for r in rows})
        if summary["faces_kept"] == 0 and reason is None and not interrupted:
            log.warning("%s", nothing_kept(state.analyser))
        try:
            writer.write_summary(summary)
        except OutputError as e:
            failed = failed or e
        if reporter is not None and stats_json is not None and failed is None:
            with contextlib.suppress(OutputError):
                reporter.report()
    if failed is not None:
        raise failed
    return RunResult(out_dir=out.given, summary=summary)
