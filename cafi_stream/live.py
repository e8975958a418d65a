"""Stage 1 for live sources (RTSP/HTTP streams, capture devices, `--loop` files): decoding that rides out faults.

- Opening runs under a watchdog of our own: `av.open` can hang on a peer that accepts and sends nothing, and
  PyAV's own timeouts are capped. A connection that stays silent past the read deadline is abandoned and replaced.
- Reconnects back off exponentially with jitter; unlimited unless `reconnect_max` >= 0.
- The frame queue drops its oldest frame when scoring falls behind, so latency stays bounded; drops are counted.
- Timestamps follow the stream's while they increase, and fall back to the wall clock when they do not.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import av

from .decode import (DecodeStats, EndOfFrames, FrameQueue, Prepare, VideoFrame, open_video, quarter_turns,
                     rotate_tag, stop_with)
from .errors import InputError, StreamError
from .sources import is_url, redact

log = logging.getLogger(__name__)


@dataclass
class LiveOptions:
    transport: str = "tcp"        # RTSP transport
    open_timeout: float = 10.0    # seconds for a connection to deliver its stream description
    read_timeout: float = 10.0    # seconds without a frame before the connection is replaced
    reconnect_max: int = -1       # reconnect attempts in a row before giving up (-1: never give up)
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    loop: bool = False            # play a file as a live source at its native rate, looping


@dataclass
class LiveStats(DecodeStats):
    reconnects: int = 0
    connected: bool = False
    last_error: str | None = None


class Connector:
    """Opens a live source: `av.open` under a watchdog of our own, retried with exponential backoff and jitter;
    counts failures and reconnects in `stats`."""

    def __init__(self, source: str, threads: int, opts: LiveOptions, stats: LiveStats, stop: threading.Event):
        self.source = source          # for connecting only
        self.name = redact(source)    # for every message
        self.threads, self.opts, self.stats, self.stop = threads, opts, stats, stop
        self.failures = 0             # failed attempts in a row; a decoded frame resets it

    def _ffmpeg_options(self) -> dict:
        us = str(int(self.opts.read_timeout * 1e6))
        if self.source.startswith(("rtsp://", "rtsps://")):
            return {"rtsp_transport": self.opts.transport, "timeout": us}
        if self.source.startswith(("http://", "https://")):
            return {"rw_timeout": us, "reconnect": "1"}
        return {}

    def open_once(self):
        """av.open under a watchdog: a helper thread opens; past the deadline it is abandoned."""
        result: dict = {}

        def target():
            try:
                result["ok"] = open_video(self.source, self.threads, self._ffmpeg_options(),
                                          timeout=(self.opts.open_timeout, self.opts.read_timeout))
            except BaseException as e:   # handed back to the caller
                result["error"] = e
            if "ok" in result and result.get("abandoned"):
                result["ok"][0].close()   # too late: nobody waits for it any more

        t = threading.Thread(target=target, name="cafi-open", daemon=True)
        t.start()
        t.join(self.opts.open_timeout)
        if t.is_alive():
            result["abandoned"] = True
            raise TimeoutError(f"no stream after {self.opts.open_timeout:g} s")
        if "error" in result:
            raise result["error"]
        container, stream, info = result["ok"]
        return container, info

    def connect(self, first: bool = False):
        """Open, retrying with backoff; raise StreamError when the cap is reached. Files under --loop fail fast."""
        while not self.stop.is_set():
            if self.failures:
                if 0 <= self.opts.reconnect_max < self.failures:
                    raise StreamError(f"{self.name}: unreachable after {self.failures} attempt(s) "
                                      f"({self.stats.last_error}); giving up (--reconnect-max "
                                      f"{self.opts.reconnect_max})")
                delay = min(self.opts.backoff_max, self.opts.backoff_initial * 2 ** (self.failures - 1))
                self.stop.wait(delay * random.uniform(0.5, 1.0))
                if self.stop.is_set():
                    break
            try:
                container, info = self.open_once()
            except InputError as e:
                if not is_url(self.source) and not self.source.startswith("/dev/"):
                    raise   # a bad file stays bad: no point retrying
                self.failed(str(e).split(": ", 1)[-1])
                continue
            except (TimeoutError, OSError, av.error.FFmpegError) as e:
                self.failed(redact(str(e)))
                continue
            if not first:
                self.stats.reconnects += 1
                log.warning("%s: reconnected", self.name)
            self.stats.connected = True
            return container, info
        raise StreamError(f"{self.name}: stopped before a connection was made")

    def failed(self, why: str) -> None:
        """Count a failed or lost connection. A lost connection is reported once per outage; failures to make
        the first one only when retries are unlimited (with a cap, the final error says it all)."""
        self.failures += 1
        was_connected, self.stats.connected = self.stats.connected, False
        if was_connected or (self.opts.reconnect_max < 0 and self.failures in (1, 10)):
            log.warning("%s: %s; reconnecting", self.name, why)
        else:
            log.debug("%s: %s (attempt %d)", self.name, why, self.failures)
        self.stats.last_error = why


class LiveClock:
    """Presentation times of one connection. A stream's own times are followed while they increase, and the wall
    clock replaces them when they are missing, go back or drift; a `--loop` file keeps its own times, shifted by
    `loop_offset`, and is paced to the wall clock (the returned delay)."""

    def __init__(self, fps: float, start: float, loop_offset: float | None):
        self.fps, self.start, self.loop_offset = fps, start, loop_offset
        self.first = self.wall_base = self.last = None

    def __call__(self, t: float | None, now: float) -> tuple[float, float]:
        """(pts, seconds to wait before handing the frame on) for a frame of stream time `t` arriving at `now`."""
        delay = 0.0
        if self.loop_offset is not None:
            t = t if t is not None else (self.last or 0.0) + 1.0 / self.fps
            pts = t + self.loop_offset
            if self.first is None:
                self.first, self.wall_base = pts, now
            delay = self.wall_base + (pts - self.first) - now
        else:
            wall = now - self.start
            usable = t is not None and self.first is not None and self.last is not None and t > self.last
            pts = self.wall_base + (t - self.first) if usable else wall
            if not usable or abs(pts - wall) > 5.0:
                self.first, self.wall_base, pts = t, wall, wall
        self.last = t
        return pts, delay


class LiveDecoder:
    """The `Decoder` interface (`info`, `stats`, `frames()`, `stop()`) for sources that never end by themselves."""

    def __init__(self, source: str, queue_size: int = 8, threads: int = 0, options: LiveOptions | None = None,
                 stop: threading.Event | None = None):
        self.opts = options or LiveOptions()
        self.stats = LiveStats()
        self._stop = threading.Event()
        stop_with(stop, self._stop)   # a caller's stop also ends the first connection attempts below
        self._prepare: Prepare | None = None
        self._gen = 0                 # connection generation: frames of an abandoned connection are ignored
        self._t0 = time.monotonic()
        self._queue = FrameQueue(queue_size, self.stats, drop_oldest=True)
        self._last_frame = time.monotonic()
        self.connector = Connector(source, threads, self.opts, self.stats, self._stop)
        self._container, self.info = self.connector.connect(first=True)

    # -- decoding thread
    def _pump(self, gen: int, container) -> None:
        loop_offset = 0.0
        try:
            while not self._stop.is_set() and gen == self._gen:
                if container is None:
                    container, _ = self.connector.connect()
                if gen != self._gen:
                    break
                end_pts = self._decode(gen, container, loop_offset)
                container.close()
                container = None
                if self.opts.loop and end_pts is not None and not self._stop.is_set():
                    loop_offset = end_pts + 1.0 / self.info.fps   # keep time running across loops
                    container, _ = self.connector.open_once()
                    continue
                if not self.opts.loop and not self._stop.is_set():
                    self.connector.failed("the stream ended")
        except BaseException as e:
            if gen == self._gen:
                self._queue.put(EndOfFrames(e), self._stop)
            return
        finally:
            if container is not None:
                container.close()
        if gen == self._gen:
            self._queue.put(EndOfFrames(), self._stop)

    def _decode(self, gen: int, container, loop_offset: float) -> float | None:
        """Decode one connection until it ends or fails; returns the last stream time (for --loop)."""
        stream = container.streams.video[0]
        tag = rotate_tag(stream)
        clock = LiveClock(self.info.fps, self._t0, loop_offset if self.opts.loop else None)
        last_pts = None
        try:
            for frame in container.decode(stream):
                if self._stop.is_set() or gen != self._gen:
                    return last_pts
                pts, delay = clock(frame.time, time.monotonic())
                if delay > 0 and self._stop.wait(delay):
                    return last_pts
                last_pts = pts
                self.connector.failures = 0
                self._last_frame = time.monotonic()
                quarter = quarter_turns(frame, tag)
                self.stats.rotation = quarter * 90
                self.stats.frames += 1
                vf = VideoFrame(self.stats.frames - 1, float(pts), frame, quarter)
                if gen == self._gen:   # frames of an abandoned connection are dropped
                    if self._prepare is not None:
                        self._prepare(vf)
                    self._queue.put(vf, self._stop)
        except (av.error.FFmpegError, OSError) as e:
            if not self._stop.is_set() and gen == self._gen:
                self.connector.failed(f"connection lost ({redact(getattr(e, 'strerror', None) or str(e))})")
            return None
        return last_pts

    # -- consumer side
    def _start(self, container) -> None:
        self._gen += 1
        self._last_frame = time.monotonic()
        threading.Thread(target=self._pump, args=(self._gen, container), name=f"cafi-live-{self._gen}",
                         daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def frames(self, prepare: Prepare | None = None, held: int = 0) -> Iterator[VideoFrame]:
        """As `Decoder.frames`, across reconnections; `held` changes nothing: the queue drops its oldest frame
        when it is full."""
        self._prepare = prepare
        self._start(self._container)
        self._container = None
        # A connection can stall inside FFmpeg past every timeout: after twice the read deadline without a frame
        # it is abandoned (its thread may stay blocked; its frames are ignored) and a new one is made.
        stall = max(2 * self.opts.read_timeout, self.opts.open_timeout + self.opts.read_timeout)
        try:
            while True:
                try:
                    item = self._queue.get(timeout=1.0)
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    if time.monotonic() - self._last_frame > stall:
                        self.connector.failed(f"no frame for {stall:g} s")
                        self._start(None)
                    continue
                if isinstance(item, EndOfFrames):
                    item.finish()
                    return
                yield item
        finally:
            self.stop()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()
