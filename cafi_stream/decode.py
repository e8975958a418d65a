"""Stage 1: decode a video with PyAV (threaded) in its own thread, handing frames in decode order with timestamps
through a bounded `FrameQueue` to a plain iterator. Files block the decoder when the consumer falls behind; live
sources (live.py) drop the oldest frame instead."""

from __future__ import annotations

import contextlib
import logging
import queue
import struct
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import av
import av.logging
import cv2
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


_I420 = ("yuv420p",)   # limited-range 4:2:0, what OpenCV's I420 conversion assumes; other formats take swscale's RGB


@dataclass(frozen=True, eq=False)
class VideoFrame:
    """One decoded frame. Its pixels become RGB only when a stage asks, at the size it asks for: most frames are
    only tracked through, and converting a whole 1080p frame costs about half as much as decoding it."""

    index: int                        # decode order, from 0
    pts_time: float                   # presentation time in seconds
    raw: av.VideoFrame | np.ndarray   # as decoded, or an HxWx3 uint8 RGB array already upright
    quarter: int = 0                  # counter-clockwise quarter turns that make `raw` upright

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) upright."""
        w, h = (self.raw.width, self.raw.height) if isinstance(self.raw, av.VideoFrame) else self.raw.shape[1::-1]
        return (h, w) if self.quarter % 2 else (w, h)

    @cached_property
    def image(self) -> np.ndarray:
        """HxWx3 uint8 RGB, upright."""
        if not isinstance(self.raw, av.VideoFrame):
            return self.raw
        if self._planar:
            return self._upright(self._i420((0, 0, self.raw.width, self.raw.height)))
        return self._upright(self.raw.to_ndarray(format="rgb24"))

    def region(self, xyxy) -> tuple[np.ndarray, np.ndarray]:
        """RGB of the part of the upright frame in `xyxy` (clipped to the frame, its top left moved down to
        multiples of 8 so that a codec's block grid keeps its place), and that top left in frame pixels. Only that
        part of a 4:2:0 frame is converted, the same way as `image`: a face's crops cost the face, not the frame.
        The latest is kept (a face's keypoint crop and its scoring crops read the same part)."""
        w, h = self.size
        x0, y0 = (min(max(0, int(np.floor(v))) // 8 * 8, limit) for v, limit in zip(xyxy[:2], (w, h)))
        x1, y1 = (min(limit, max(lo, int(np.ceil(v)))) for v, lo, limit in zip(xyxy[2:], (x0, y0), (w, h)))
        origin = np.array([x0, y0], np.float32)
        if self._planar and not self.quarter and "image" not in self.__dict__:
            rect = (x0, y0, x1 + x1 % 2, y1 + y1 % 2)   # within the frame: its sides are even
            kept = self.__dict__.get("_region")
            if kept is None or kept[0] != rect:
                kept = self.__dict__["_region"] = (rect, self._i420(rect))
            return kept[1], origin
        return self.image[y0:y1, x0:x1], origin

    @property
    def _planar(self) -> bool:
        """A 4:2:0 frame that OpenCV converts (even sides)."""
        f = self.raw
        return (isinstance(f, av.VideoFrame) and f.format.name in _I420 and f.width % 2 == 0
                and f.height % 2 == 0)

    def _planes(self) -> list[np.ndarray]:
        return [np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:p.height, :p.width] for p in self.raw.planes]

    def _i420(self, rect: tuple[int, int, int, int]) -> np.ndarray:
        """RGB of the stored frame's even-cornered rectangle (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = rect
        if x1 <= x0 or y1 <= y0:
            return np.zeros((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)
        h, w = y1 - y0, x1 - x0
        luma, u, v = self._planes()
        packed = np.empty((h * 3 // 2, w), np.uint8)   # OpenCV's I420 layout: Y, then U and V, each a block
        packed[:h] = luma[y0:y1, x0:x1]
        chroma, q = packed[h:].reshape(-1), (h // 2) * (w // 2)
        chroma[:q].reshape(h // 2, w // 2)[:] = u[y0 // 2:y1 // 2, x0 // 2:x1 // 2]
        chroma[q:].reshape(h // 2, w // 2)[:] = v[y0 // 2:y1 // 2, x0 // 2:x1 // 2]
        return cv2.cvtColor(packed, cv2.COLOR_YUV2RGB_I420)

    def scaled(self, scale: float) -> np.ndarray:
        """RGB, upright, `scale` times the frame's size (bilinear; `scale` <= 1). The latest is kept."""
        if scale >= 1:
            return self.image
        kept = self.__dict__.get("_scaled")
        if kept is None or kept[0] != scale:
            w, h = self.size
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            kept = self.__dict__["_scaled"] = (scale, self._resized(size, cv2.INTER_LINEAR))
        return kept[1]

    @cached_property
    def thumbnail(self) -> np.ndarray:
        """The frame at 64x36 RGB (area-averaged), what the shot-cut rules read. Frames of 576 lines and more are
        sampled every n-th pixel first: area-averaging a whole 1080p frame costs more than the rules."""
        return self._resized((64, 36), cv2.INTER_AREA, step=max(1, self.size[1] // 288))

    def _upright(self, image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(image, self.quarter)) if self.quarter else image

    def _resized(self, size: tuple[int, int], interpolation: int, step: int = 1) -> np.ndarray:
        """RGB at `size` (width, height, upright). A 4:2:0 frame is resized plane by plane and converted at the
        small size, so the whole frame is never converted."""
        w, h = size if not self.quarter % 2 else size[::-1]   # in stored orientation
        if self._planar and "image" not in self.__dict__:
            ew, eh = w + w % 2, h + h % 2   # I420 needs even sides; the extra line is cut off below
            planes = [cv2.resize(_every(pix, step), dsize, interpolation=interpolation).ravel()
                      for pix, dsize in zip(self._planes(), ((ew, eh), (ew // 2, eh // 2), (ew // 2, eh // 2)))]
            rgb = cv2.cvtColor(np.concatenate(planes).reshape(eh * 3 // 2, ew), cv2.COLOR_YUV2RGB_I420)[:h, :w]
            return self._upright(rgb)
        image = self.image
        return cv2.resize(_every(image, step), size, interpolation=interpolation)


def _every(pix: np.ndarray, step: int) -> np.ndarray:
    """`pix[::step, ::step]`, contiguous. Where `step` divides both sides, OpenCV's nearest-neighbour resize picks
    exactly those pixels, in about a third of the time numpy takes to copy the strided view."""
    h, w = pix.shape[:2]
    if step == 1 or h % step or w % step:
        return np.ascontiguousarray(pix[::step, ::step])
    return cv2.resize(pix, (w // step, h // step), interpolation=cv2.INTER_NEAREST)


# Work the decoding thread does on each frame before handing it over, in parallel with the stages: making the
# derived images they will ask for (`VideoFrame.thumbnail`, `scaled`), which the frame keeps.
Prepare = Callable[[VideoFrame], None]


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
    dropped: int = 0               # frames a live source dropped because the consumer fell behind


class EndOfFrames:
    """Queue sentinel: decoding finished (normally, or with `error`)."""

    def __init__(self, error: BaseException | None = None):
        self.error = error

    def finish(self) -> None:
        """Re-raise the decoder's error, if it had one, in the consumer."""
        if self.error is not None:
            raise self.error


class FrameQueue:
    """The hand-over between a decoding thread and the consumer, bounded by `size`. When it is full, `put` waits
    (files: nothing is lost), or with `drop_oldest` drops the oldest waiting frame and counts it in
    `stats.dropped` (live sources: latency stays bounded)."""

    def __init__(self, size: int, stats: DecodeStats, drop_oldest: bool = False):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self.stats, self.drop_oldest = stats, drop_oldest

    def put(self, item, stop: threading.Event) -> None:
        """Hand `item` over. Once `stop` is set (the consumer is gone) a waiting frame is given up, and the end
        marker takes the oldest frame's place."""
        while True:
            try:
                self._queue.put(item, timeout=0 if self.drop_oldest else 0.1)
                return
            except queue.Full:
                if self.drop_oldest or (stop.is_set() and isinstance(item, EndOfFrames)):
                    with contextlib.suppress(queue.Empty):
                        self._queue.get_nowait()
                        if self.drop_oldest:   # a stopped file's frame is no loss: its consumer is gone
                            self.stats.dropped += 1
                elif stop.is_set():
                    return

    def get(self, timeout: float | None = None):
        """The next frame or end marker; queue.Empty after `timeout` seconds without one."""
        return self._queue.get(timeout=timeout)

    def qsize(self) -> int:
        return self._queue.qsize()


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


def quarter_turns(frame: av.VideoFrame, tag_rotation: int = 0) -> int:
    """Counter-clockwise quarter turns that show `frame` upright. Phones store portrait video sideways with a
    display matrix (or, in older files, a `rotate` tag)."""
    return round((frame.rotation or tag_rotation) / 90) % 4


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


def stop_with(caller: threading.Event | None, own: threading.Event) -> None:
    """Set a decoder's `own` stop once a `caller`'s stop is set (from any thread). Never the other way: a decoder
    that stops by itself (the input ended or failed) does not look stopped to its caller."""
    if caller is None:
        return

    def wait() -> None:
        while not caller.wait(0.2):
            if own.is_set():
                return
        own.set()

    threading.Thread(target=wait, name="cafi-stop", daemon=True).start()


class Decoder:
    """Decodes in its own thread and hands frames over through a `FrameQueue`; its bound gives back-pressure.
    `stop`, a caller's event, stops it as `stop()` does."""

    def __init__(self, source: str, queue_size: int = 16, threads: int = 0, stop: threading.Event | None = None):
        self.container, self.stream, self.info = open_video(source, threads)
        self.queue_size = queue_size
        self._prepare: Prepare | None = None
        self.stats = DecodeStats()
        self._stop = threading.Event()
        stop_with(stop, self._stop)

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
                quarter = quarter_turns(frame, tag)
                self.stats.rotation = quarter * 90
                pts = frame.time
                if pts is None:   # no usable timestamp: derive one from the frame rate
                    pts = (last_time + 1.0 / self.info.fps) if last_time is not None else 0.0
                last_time = pts
                self.stats.seconds += time.perf_counter() - t0
                yield VideoFrame(index, float(pts), frame, quarter)
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

    def _pump(self, frames: FrameQueue) -> None:
        end = EndOfFrames()
        try:
            for frame in self._frames():
                self.stats.frames += 1
                if self._prepare is not None:
                    self._prepare(frame)
                frames.put(frame, self._stop)   # once stopped, the decoding loop ends at its next frame
        except BaseException as e:   # handed to the consumer, which re-raises it
            end = EndOfFrames(e)
        finally:
            self.container.close()
            frames.put(end, self._stop)

    def frames(self, prepare: Prepare | None = None, held: int = 0) -> Iterator[VideoFrame]:
        """Decoded frames, in order. Decoding runs ahead by at most `queue_size` frames, plus the `held` frames the
        consumer may hold at once (so that decoding goes on meanwhile); closing the iterator stops it. A decoding
        error is raised here, after the frames before it. `prepare` runs on each frame in the decoding thread,
        before it is handed over (`Prepare`)."""
        self._prepare = prepare
        frames = FrameQueue(self.queue_size + held, self.stats)
        thread = threading.Thread(target=self._pump, args=(frames,), name="cafi-decode", daemon=True)
        thread.start()
        try:
            while True:
                item = frames.get()
                if isinstance(item, EndOfFrames):
                    item.finish()
                    return
                yield item
        finally:
            self.stop()
            thread.join(timeout=5)
