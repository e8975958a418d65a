"""`cafi-stream serve`: many cameras in one process, one model set, best shots published as events.

Each camera runs the live pipeline (`pipeline.run`, its own connection, watchdog and reconnect) in its own thread
and writes `OUT/<name>/<session>/`, a single live run's layout, one session folder per start of the service, so that
nothing an earlier session wrote is ever replaced. The models are loaded once and shared; one camera's failure
ends only that camera's thread. Every written track (and snapshot of a track that stays open) becomes an
`events.Event`, published to the configured sinks.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import re
import threading
import time
import tomllib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .batching import JoinedEngine
from .config import Config, cli_options, load_config
from .errors import InputError
from .outdir import CAMERA_NAME, EVENTS_DIR, OutputDir, check_output_file
from .events import Delivery, Event, JsonLinesSink, MqttSink, Spool, WebhookSink, read_images
from .sources import redact, source_stem

log = logging.getLogger(__name__)



def camera_options() -> dict[str, tuple[str, str]]:
    """Run options a camera may set for itself, by flag name without dashes ("topk", "min_face"): every
    command-line option except those that choose or build the shared models."""
    return {f.metadata["flag"].lstrip("-").replace("-", "_"): (section, f.name)
            for section, f in cli_options() if not f.metadata["engines"]}


@dataclass(frozen=True)
class CameraSpec:
    name: str
    url: str
    options: tuple[tuple[str, object], ...] = ()   # (option, value) of camera_options()

    @classmethod
    def parse(cls, table: dict, where: str) -> "CameraSpec":
        table = dict(table)
        name, url = table.pop("name", None), table.pop("url", None)
        if not isinstance(name, str) or not CAMERA_NAME.match(name):
            raise InputError(f"{where}: camera name {name!r} must be 1-64 letters, digits, '_' or '-', "
                             "not starting with '_' or '-'")
        if not isinstance(url, str) or not url:
            raise InputError(f"{where}: camera {name} needs a url")
        known = camera_options()
        for key in table:
            if key not in known:
                raise InputError(f"{where}: camera {name}: unknown option {key!r} (known: {', '.join(sorted(known))})")
        return cls(name, url, tuple(sorted(table.items())))

    def overrides(self) -> dict:
        out: dict = {}
        for key, value in self.options:
            section, field = camera_options()[key]
            out.setdefault(section, {})[field] = value
        return out

    @property
    def shown(self) -> dict:
        return {"name": self.name, "url": redact(self.url), **dict(self.options)}


def read_cameras(path: str | Path) -> list[CameraSpec]:
    """The cameras of a TOML file: `[[camera]]` tables with `name`, `url` and run options."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"--cameras {path}: {e}") from None
    tables = data.get("camera", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise InputError(f"--cameras {path}: expected [[camera]] tables")
    return unique([CameraSpec.parse(t, f"--cameras {path}") for t in tables])


def from_sources(sources: list[str]) -> list[CameraSpec]:
    """Cameras for sources named on the command line, each named after its source (made unique)."""
    specs, taken = [], set()
    for source in sources:
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", source_stem(source)).strip("_-")[:56] or "camera"
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        specs.append(CameraSpec(name, source))
    return specs


def unique(specs: list[CameraSpec]) -> list[CameraSpec]:
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise InputError(f"camera names must be unique: {', '.join(sorted(dup))}")
    return specs


class Histogram:
    """Counts of values at or under each bound, their number and sum: fixed memory however long a camera runs."""

    BOUNDS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)

    def __init__(self):
        self.counts = [0] * len(self.BOUNDS)
        self.n, self.sum = 0, 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.BOUNDS):
            self.counts[i] += value <= bound
        self.n += 1
        self.sum += value


class Camera:
    """One camera's pipeline thread and its figures."""

    def __init__(self, spec: CameraSpec, cfg: Config, models, root: Path, publish):
        self.spec, self.cfg, self.models, self.root, self.publish = spec, cfg, models, root, publish
        self.stop_event = threading.Event()
        self.health: dict = {}
        self.state = "starting"
        self.error: str | None = None
        self.latest: Event | None = None
        self.latency = Histogram()   # frame-to-event seconds of final events
        self._frames: deque[tuple[float, float]] = deque(maxlen=4096)   # (pts, wall) of recent frames
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        session, n = stamp, 1
        while (root / spec.name / session).exists():
            n += 1
            session = f"{stamp}-{n}"
        self.session = f"{spec.name}/{session}"
        self.thread = threading.Thread(target=self._run, name=f"cafi-camera-{spec.name}", daemon=True)

    def start(self) -> "Camera":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        from .pipeline import RunHooks, run

        folder = self.root / self.spec.name
        try:
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise InputError(f"camera {self.spec.name}: {folder} is not a folder of this service")
            self.state = "running"
            result = run(self.spec.url, self.cfg, out_dir=self.root / self.session, models=self.models,
                         on_status=self._status, hooks=RunHooks(self._result, self._frame, self.stop_event))
            self.health.update(result.summary.get("live") or {})
            self.state = "stopped"
        except Exception as e:   # one camera's failure ends only its own thread
            if self.stop_event.is_set():   # stopped while it was still connecting
                self.state = "stopped"
                return
            self.state, self.error = "failed", redact(str(e))
            log.error("camera %s: %s", self.spec.name, self.error)

    def _status(self, health: dict) -> None:
        self.health = dict(health)

    def _frame(self, frame) -> None:
        self._frames.append((frame.pts_time, time.time()))

    def _seen_at(self, pts: float) -> float:
        """Wall time at which the frame at `pts` (the track's last sighting) was handled."""
        frames = list(self._frames)
        i = bisect.bisect_left(frames, (pts, -1.0))
        return frames[min(i, len(frames) - 1)][1] if frames else time.time()

    def _result(self, result, rows) -> None:
        if not rows:
            return
        images = tuple(f"{self.session}/{name}" for row in rows for name in row.images)
        event = Event(self.spec.name, result.track_id, result.final, tuple(result.span),
                      tuple(row.to_json() for row in rows), images, self._seen_at(result.span[1]))
        self.latest = event
        if result.final:
            self.latency.observe(max(0.0, event.created - event.seen_at))
        try:
            self.publish(event)
        except OSError as e:   # a full disk under the spool or the events file: the camera and its files go on
            log.error("camera %s: event %s not published: %s", self.spec.name, event.id, e)


class Publisher:
    """Events to every sink: JSON lines at once; webhook and MQTT through their spools. Counts per camera."""

    def __init__(self, root: Path, jsonl: str | None = None, sinks: tuple = (), with_images: bool = False):
        self.root, self.with_images = root, with_images
        self.sent: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self._lock = threading.Lock()
        self.jsonl = JsonLinesSink(jsonl) if jsonl else None
        self.deliveries = [Delivery(s, Spool(root / EVENTS_DIR / s.name), self._count(self.sent),
                                    self._count(self.failed)) for s in sinks]

    def _count(self, table: dict):
        def add(camera: str) -> None:
            with self._lock:
                table[camera] = table.get(camera, 0) + 1
        return add

    def __call__(self, event: Event) -> None:
        if self.with_images:
            event = dataclasses.replace(event, image_bytes=read_images(self.root, event.images))
        payload = event.to_json()
        if self.jsonl is not None:
            self.jsonl.send(payload, event.id)
            if not self.deliveries:
                self._count(self.sent)(event.camera)
        for d in self.deliveries:
            d.submit(event, payload)

    def spooled(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.deliveries:
            for _, camera, _ in d.spool.pending():
                out[camera] = out.get(camera, 0) + 1
        return out

    def close(self, grace: float = 5.0) -> None:
        for d in self.deliveries:
            d.drain(grace)
        if self.jsonl is not None:
            self.jsonl.close()


class Service:
    """The cameras of one `serve` process over one model set."""

    def __init__(self, out: str | Path, config_path: str | None = None, overrides: dict | None = None,
                 jsonl: str | None = None, webhook: str | None = None, mqtt: str | None = None,
                 with_images: bool = False):
        from .pipeline import Models

        self.config_path, self.overrides = config_path, overrides or {}
        self.cfg = load_config(config_path, self.overrides)
        self.out = OutputDir(out)
        self.out.check(serve=True)
        # Bad sink URLs and files fail here, before any model loads.
        if jsonl is not None and jsonl != "-":
            check_output_file(jsonl, "--events")
        sinks = tuple(s for s in (WebhookSink(webhook) if webhook else None, MqttSink(mqtt) if mqtt else None) if s)
        models = Models.load(self.cfg)
        # Faces (and the detector's frames and crops) of every camera that wait while an engine is busy go into its
        # next call together.
        batch = self.cfg.runtime.max_batch
        self.models = dataclasses.replace(models, serfiq=JoinedEngine(models.serfiq, batch),
                                          iqa=JoinedEngine(models.iqa, batch) if models.iqa is not None else None,
                                          faces=models.faces.joined(batch))
        self.out.claim(serve=True)   # locked: one service per folder
        self.root = self.out.root
        self.publisher = Publisher(self.root, jsonl, sinks, with_images)
        self.cameras: dict[str, Camera] = {}
        self._lock = threading.Lock()
        self.started = time.time()

    def _camera_config(self, spec: CameraSpec) -> tuple[Config, object]:
        overrides = spec.overrides()
        overrides.setdefault("live", {}).setdefault("status_interval", 1.0)
        cfg = load_config(self.config_path, _merge(self.overrides, overrides))
        models = self.models
        if cfg.faces.min_face != self.cfg.faces.min_face:   # the detector reads frames at this camera's scale
            models = dataclasses.replace(models, faces=models.faces.for_min_face(cfg.faces.min_face))
        return cfg, models

    def add(self, spec: CameraSpec) -> None:
        with self._lock:
            if spec.name in self.cameras and self.cameras[spec.name].thread.is_alive():
                raise InputError(f"camera {spec.name} is already running")
            cfg, models = self._camera_config(spec)
            self.cameras[spec.name] = Camera(spec, cfg, models, self.root, self.publisher).start()
        log.info("camera %s: started (%s)", spec.name, redact(spec.url))

    def remove(self, name: str, wait: float = 60.0) -> None:
        """Stop a camera: its open tracks are written before it goes."""
        with self._lock:
            cam = self.cameras.pop(name, None)
        if cam is None:
            raise InputError(f"no camera {name}")
        cam.stop()
        cam.join(wait)

    def apply(self, specs: list[CameraSpec]) -> None:
        """Make the running cameras these (a reloaded --cameras file): stop the ones gone or changed, start the new."""
        wanted = {s.name: s for s in specs}
        for name, cam in list(self.cameras.items()):
            if wanted.get(name) != cam.spec:
                self.remove(name)
        for name, spec in wanted.items():
            if name not in self.cameras:
                self.add(spec)

    def stop(self, grace: float = 5.0) -> None:
        cams = list(self.cameras.values())
        for cam in cams:
            cam.stop()
        for cam in cams:
            cam.join(120)
        self.publisher.close(grace)
        self.models.close()
        self.out.release()

    def engine_counts(self) -> dict[str, dict[str, int]]:
        """Per shared engine (SER-FIQ, IQA, the detector): the calls it made and the rows (faces; the detector's
        frames and crops) they held, from every camera."""
        engines = {"serfiq": self.models.serfiq, "iqa": self.models.iqa,
                   "detector": getattr(self.models.faces.detector, "engine", None)}
        return {name: {"calls": e.joined_calls, "rows": e.joined_rows} for name, e in engines.items()
                if isinstance(e, JoinedEngine)}

    def describe(self) -> list[dict]:
        return [{**cam.spec.shown, "state": cam.state, "error": cam.error, "session": cam.session,
                 **{k: cam.health.get(k) for k in ("input_fps", "processed_fps", "dropped", "reconnects",
                                                    "open_tracks", "tracks_written", "connected")}}
                for cam in self.cameras.values()]


def _merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) for k, v in a.items()}
    for section, values in b.items():
        out.setdefault(section, {}).update(values)
    return out
