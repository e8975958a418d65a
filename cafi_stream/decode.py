"""Stage 1: decode a video with PyAV (threaded) into a bounded asyncio queue, in decode order with timestamps."""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import av
import av.logging
import numpy as np

from .errors import InputError
from .sources import is_capture_device, is_url, redact

log = logging.getLogger(__name__)

# FFmpeg's own error messages (corrupt or cut-short data) reach Python logging under "libav" while a file decodes;
# they are counted per decoder, not printed. PyAV's log callback takes the GIL inside FFmpeg's decoding threads, so a
# thread that holds the GIL while it waits for them (closing a container mid-stream) would deadlock: the callback is
# on only while a file decodes, never for live sources.
av.logging.set_level(None)
logging.getLogger("libav").propagate = False
logging.getLogger("libav").addHandler(logging.NullHandler())


class _FFmpegErrors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.count = 0
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.first is None:
            self.first = f"{record.name.removeprefix('libav.')}: {record.getMessage().strip()}"


@dataclass(frozen=True)
class VideoFrame:
    index: int          # decode order, from 0
    pts_time: float     # presentation time in seconds
    image: np.ndarray   # HxWx3 uint8 RGB


@dataclass(frozen=True)
class VideoInfo:
    source: str
    width: int
    height: int
    fps: float
    frames: int | None       # as the container declares it (None when unknown)
    duration: float | None   # seconds, as the container declares it
    start_time: float        # first presentation time, seconds
    codec: str


@dataclass
class DecodeStats:
    frames: int = 0
    seconds: float = 0.0
    truncated: str | None = None   # why decoding stopped early, if it did
    rotation: int = 0              # counter-clockwise degrees the last frame was turned to display upright


class EndOfFrames:
    """Queue sentinel: decoding finished (normally, or with `error`)."""

    def __init__(self, error: BaseException | None = None):
        self.error = error

    def finish(self) -> None:
        """Re-raise the decoder's error, if it had one, in the consumer."""
        if self.error is not None:
            raise self.error


def _mp4_top_level_boxes(path: Path, limit: int = 64) -> list[str]:
    types = []
    with open(path, "rb") as f:
        size_total = path.stat().st_size
        pos = 0
        while pos + 8 <= size_total and len(types) < limit:
            f.seek(pos)
            size, kind = struct.unpack(">I4s", f.read(8))
            if size == 1:
                size = struct.unpack(">Q", f.read(8))[0]
            elif size == 0:
                size = size_total - pos
            types.append(kind.decode("latin-1"))
            if size < 8:
                break
            pos += size
    return types


def _explain_unreadable(path: Path) -> str:
    try:
        boxes = _mp4_top_level_boxes(path)
    except (OSError, struct.error):
        boxes = []
    if "ftyp" in boxes and "moov" not in boxes:
        return f"{path}: the MP4 index ('moov') is missing, so the file was probably cut short while being written"
    return f"{path}: not a readable video file"


def upright(frame: av.VideoFrame, tag_rotation: int = 0) -> tuple[np.ndarray, int]:
    """The frame as HxWx3 RGB in its display orientation, and the counter-clockwise degrees it was turned by.
    Phones store portrait video sideways with a display matrix (or, in older files, a `rotate` tag)."""
    image = frame.to_ndarray(format="rgb24")
    quarter = round((frame.rotation or tag_rotation) / 90) % 4
    if quarter:
        image = np.ascontiguousarray(np.rot90(image, quarter))
    return image, quarter * 90


def rotate_tag(stream) -> int:
    """The old `rotate` metadata tag (clockwise degrees) as a counter-clockwise rotation; 0 when absent."""
    try:
        return -int(float(stream.metadata.get("rotate", 0)))
    except ValueError:
        return 0


def open_video(source: str, threads: int = 0, options: dict | None = None, timeout: tuple | None = None
               ) -> tuple[av.container.InputContainer, av.video.stream.VideoStream, VideoInfo]:
    """Open `source` and describe its first video stream. Bad input raises InputError with a one-line reason.
    `info.source`, and every message, name the source with its credentials redacted."""
    fmt = "v4l2" if is_capture_device(source) else None
    name = redact(source)
    if not is_url(source) and not fmt:
        path = Path(source)
        if not path.exists():
            raise InputError(f"{source}: no such file")
        if path.is_dir():
            raise InputError(f"{source}: is a directory, not a video file")
        if path.stat().st_size == 0:
            raise InputError(f"{source}: empty file")
    try:
        container = av.open(source, mode="r", format=fmt, options=options or {}, timeout=timeout)
    except av.error.FFmpegError as e:
        if is_url(source) or fmt:
            raise InputError(f"{name}: cannot open ({redact(e.strerror or str(e))})") from None
        raise InputError(_explain_unreadable(Path(source))) from None
    except OSError as e:
        raise InputError(f"{name}: {redact(e.strerror or str(e))}") from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{name}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"     # frame + slice threads
    stream.thread_count = threads
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 25.0
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    info = VideoInfo(source=name, width=stream.codec_context.width, height=stream.codec_context.height, fps=fps,
                     frames=stream.frames or None, duration=duration, start_time=start,
                     codec=stream.codec_context.name)
    return container, stream, info


class Decoder:
    """Decodes in its own thread and hands frames to an asyncio queue; the queue bound gives back-pressure."""

    def __init__(self, source: str, queue_size: int = 16, threads: int = 0):
        self.container, self.stream, self.info = open_video(source, threads)
        self.queue_size = queue_size
        self.stats = DecodeStats()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def _frames(self):
        errors = _FFmpegErrors()
        logging.getLogger("libav").addHandler(errors)
        av.logging.set_level(av.logging.ERROR)
        try:
            yield from self._decode()
        finally:
            av.logging.set_level(None)
            time.sleep(0.01)   # a decoding thread already waiting in the callback finishes before the close
            logging.getLogger("libav").removeHandler(errors)
        if errors.count and not self.stats.truncated:
            self.stats.truncated = f"the input has damaged or missing data ({errors.first})"

    def _decode(self):
        t0 = time.perf_counter()
        index = 0
        last_time = None
        tag = rotate_tag(self.stream)
        try:
            for frame in self.container.decode(self.stream):
                image, self.stats.rotation = upright(frame, tag)
                pts = frame.time
                if pts is None:   # no usable timestamp: derive one from the frame rate
                    pts = (last_time + 1.0 / self.info.fps) if last_time is not None else 0.0
                last_time = pts
                self.stats.seconds += time.perf_counter() - t0
                yield VideoFrame(index=index, pts_time=float(pts), image=image)
                t0 = time.perf_counter()
                index += 1
                if self._stop.is_set():
                    return
        except av.error.FFmpegError as e:
            if index == 0:
                raise InputError(f"{self.info.source}: no decodable video frame ({e.strerror or e})") from None
            self.stats.truncated = f"decoding stopped at frame {index} ({e.strerror or e})"
            return
        if index == 0:
            raise InputError(f"{self.info.source}: no decodable video frame")
        info = self.info
        if not is_url(info.source) and info.duration and last_time is not None:
            end = info.start_time + info.duration
            if last_time < end - max(1.0, 0.05 * info.duration):
                self.stats.truncated = f"the video ends at {last_time:.1f} s of the {end:.1f} s it declares"

    def _pump(self, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> None:
        end = EndOfFrames()
        try:
            for frame in self._frames():
                self.stats.frames += 1
                asyncio.run_coroutine_threadsafe(queue.put(frame), loop).result()
        except BaseException as e:   # handed to the consumer, which re-raises it in the event loop
            end = EndOfFrames(e)
        finally:
            self.container.close()
            asyncio.run_coroutine_threadsafe(queue.put(end), loop).result()

    async def frames(self):
        """Async iterator over decoded frames. Decoding runs ahead by at most `queue_size` frames."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.queue_size)
        thread = threading.Thread(target=self._pump, args=(queue, loop), name="cafi-decode", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, EndOfFrames):
                    item.finish()
                    return
                yield item
        finally:
            self.stop()
            while thread.is_alive():   # drain so the decoder thread can finish
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    await asyncio.sleep(0.01)
                    continue
                if isinstance(item, EndOfFrames):
                    break
            thread.join(timeout=5)
