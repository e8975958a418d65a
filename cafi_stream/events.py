"""Best-shot events of a `serve` process, delivered at least once to JSON lines, an HTTP webhook or MQTT.

An event is one track's kept faces: final when the track ended, a snapshot while a track stays open. Every event
has an id (a receiver drops the duplicates that at-least-once delivery can give). For each network sink an event is
first written to that sink's spool folder (one file per event, written atomically), sent from there by the sink's
own thread, and removed once the receiver took it; a receiver that is down, or a restart of the service, leaves it
in the spool to be sent later, oldest first, with exponential backoff between failed attempts.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from .errors import InputError
from .outdir import atomic_write
from .sources import redact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    camera: str
    track_id: int
    final: bool
    span: tuple[float, float]           # first and last time the track was seen, seconds of the camera's stream
    rows: tuple[dict, ...]              # the kept faces' metadata rows, best first
    images: tuple[str, ...]             # their crops, relative to the service's --out folder
    seen_at: float                      # wall time (Unix seconds) when the track was last seen
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    image_bytes: dict | None = None     # crop file -> its bytes in base64 (JPEG, PNG), with --event-images

    def to_json(self) -> bytes:
        body = {"id": self.id, "type": "track" if self.final else "snapshot", "camera": self.camera,
                "track_id": self.track_id, "final": self.final, "span": list(self.span), "created": self.created,
                "seen_at": self.seen_at, "rows": list(self.rows), "images": list(self.images)}
        if self.image_bytes is not None:
            body["image_bytes"] = self.image_bytes
        return json.dumps(body).encode()


def read_images(root: Path, images) -> dict:
    return {name: base64.b64encode((root / name).read_bytes()).decode() for name in images}


class Sink(Protocol):
    name: str

    def send(self, payload: bytes, event_id: str) -> None:
        """Deliver one event or raise."""


class JsonLinesSink:
    """One JSON line per event, appended to a file (or written to stdout, `-`)."""

    name = "jsonl"

    def __init__(self, target: str):
        self.target = target
        self._lock = threading.Lock()
        # The CLI sends library prints to stderr while it works: "-" is the process's real stdout.
        self._file = sys.__stdout__ if target == "-" else open(target, "a", encoding="utf-8")

    def send(self, payload: bytes, event_id: str) -> None:
        with self._lock:
            self._file.write(payload.decode() + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not sys.__stdout__:
            self._file.close()


class WebhookSink:
    """HTTP POST of each event as JSON; any 2xx answer is delivery. The event id is also in `X-Cafi-Event-Id`."""

    name = "webhook"

    def __init__(self, url: str, timeout: float = 10.0):
        if urlsplit(url).scheme not in ("http", "https"):
            raise InputError(f"--webhook {redact(url)}: not an http(s) URL")
        self.url, self.timeout = url, timeout

    def send(self, payload: bytes, event_id: str) -> None:
        req = urllib.request.Request(self.url, data=payload, method="POST",
                                     headers={"Content-Type": "application/json", "X-Cafi-Event-Id": event_id})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as answer:
                answer.read()
        except urllib.error.URLError as e:   # the URL may hold credentials: never in the message
            raise ConnectionError(f"webhook {redact(self.url)}: {getattr(e, 'reason', e)}") from None


class MqttSink:
    """Each event published (QoS 1) to a topic of an MQTT broker: mqtt://[user:pass@]host[:port]/topic."""

    name = "mqtt"

    def __init__(self, url: str, timeout: float = 10.0):
        parts = urlsplit(url)
        topic = parts.path.lstrip("/")
        if parts.scheme != "mqtt" or not parts.hostname or not topic:
            raise InputError(f"--mqtt {redact(url)}: expected mqtt://HOST[:PORT]/TOPIC")
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise InputError("--mqtt needs paho-mqtt: pip install 'cafi-stream[serve]'") from None
        self.host, self.port, self.topic, self.timeout = parts.hostname, parts.port or 1883, topic, timeout
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cafi-stream-{uuid.uuid4().hex[:8]}")
        if parts.username:
            self.client.username_pw_set(parts.username, parts.password)
        self._connected = False

    def send(self, payload: bytes, event_id: str) -> None:
        if not self._connected:
            self.client.connect(self.host, self.port, keepalive=30)
            self.client.loop_start()
            self._connected = True
        info = self.client.publish(self.topic, payload, qos=1)
        info.wait_for_publish(timeout=self.timeout)
        if not info.is_published():
            self.client.loop_stop()
            self.client.disconnect()
            self._connected = False
            raise ConnectionError(f"mqtt {self.host}:{self.port}: not acknowledged")

    def close(self) -> None:
        if self._connected:
            self.client.loop_stop()
            self.client.disconnect()


_SPOOLED = re.compile(r"^(\d{20})-([A-Za-z0-9_-]+)-([0-9a-f]{32})\.json$")


class Spool:
    """Events waiting for one sink: `<folder>/<ns>-<camera>-<id>.json`, oldest first. Files with other names are
    never read or removed."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def put(self, event: Event, payload: bytes) -> None:
        atomic_write(self.folder / f"{time.time_ns():020d}-{event.camera}-{event.id}.json", payload)

    def pending(self) -> list[tuple[Path, str, str]]:
        """(file, camera, event id) of every spooled event, oldest first."""
        out = []
        for path in sorted(self.folder.iterdir()):
            m = _SPOOLED.match(path.name)
            if m and path.is_file() and not path.is_symlink():
                out.append((path, m.group(2), m.group(3)))
        return out


class Delivery:
    """One sink's spool and the thread that empties it."""

    def __init__(self, sink: Sink, spool: Spool, on_sent, on_failed, backoff=(0.5, 30.0)):
        self.sink, self.spool = sink, spool
        self.on_sent, self.on_failed = on_sent, on_failed
        self.backoff = backoff
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"cafi-events-{sink.name}", daemon=True)
        self._thread.start()

    def submit(self, event: Event, payload: bytes) -> None:
        self.spool.put(event, payload)
        self._wake.set()

    def _loop(self) -> None:
        delay = self.backoff[0]
        while not self._stop.is_set():
            self._wake.clear()
            failed = False
            for path, camera, event_id in self.spool.pending():
                if self._stop.is_set():
                    return
                try:
                    self.sink.send(path.read_bytes(), event_id)
                except Exception as e:   # the receiver is down or refused: keep it, try again later
                    log.warning("%s: %s; event kept in %s", self.sink.name, redact(str(e)), self.spool.folder)
                    self.on_failed(camera)
                    failed = True
                    break
                path.unlink(missing_ok=True)
                self.on_sent(camera)
                delay = self.backoff[0]
            if failed:
                self._stop.wait(delay)
                delay = min(self.backoff[1], delay * 2)
            else:
                self._wake.wait(1.0)

    def drain(self, seconds: float) -> None:
        """Give the spool up to `seconds` to empty, then stop the thread (what is left stays spooled)."""
        end = time.monotonic() + seconds
        while self.spool.pending() and time.monotonic() < end:
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
