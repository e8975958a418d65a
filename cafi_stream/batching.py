"""Micro-batching across faces and frames: a bounded batch and a bounded wait, so that GPU engines see full
batches while a live stream's latency stays bounded."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Generic, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Collects items; runs `fn(items) -> results` when `max_batch` are waiting or the oldest has waited
    `max_wait_ms`. `poll` and `flush` return (item, result) pairs in submission order."""

    def __init__(self, fn: Callable[[list[T]], list[R]], max_batch: int, max_wait_ms: float,
                 clock: Callable[[], float] | None = None):
        self.fn = fn
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000.0
        self.clock = clock or time.monotonic
        self.items: list[T] = []
        self._since = 0.0
        self.batches = 0
        self.calls = 0

    def add(self, item: T) -> None:
        if not self.items:
            self._since = self.clock()
        self.items.append(item)

    def poll(self) -> list[tuple[T, R]]:
        if len(self.items) >= self.max_batch or (self.items and self.clock() - self._since >= self.max_wait):
            return self.flush()
        return []

    def flush(self) -> list[tuple[T, R]]:
        out = []
        while self.items:
            batch, self.items = self.items[:self.max_batch], self.items[self.max_batch:]
            results = self.fn(batch)
            self.batches += 1
            self.calls += len(batch)
            out.extend(zip(batch, results))
        self._since = self.clock()
        return out


def take_rows(result, a: int, b: int):
    """Rows a:b of an engine's result: an array, a list of arrays (`run`'s outputs), or a frozen dataclass of arrays
    (serfiq.SerFiqResult)."""
    if isinstance(result, np.ndarray):
        return result[a:b]
    if isinstance(result, (list, tuple)):
        return type(result)(take_rows(r, a, b) for r in result)
    return dataclasses.replace(result, **{f.name: getattr(result, f.name)[a:b] for f in dataclasses.fields(result)})


@dataclasses.dataclass
class _Call:
    method: str          # "__call__" or "run"
    x: np.ndarray
    done: threading.Event
    result: object = None
    error: BaseException | None = None

    @property
    def key(self) -> tuple:
        """Calls with the same key can be one: the same method on rows of one shape."""
        return self.method, self.x.shape[1:], self.x.dtype


class JoinedEngine:
    """One engine shared by many threads (`serve`'s cameras): the calls that arrive while the engine is busy are
    joined into its next call (up to `max_batch` rows) where they have the same method and row shape (scoring
    engines' faces; a detector's frames of one size, or its crops around tracked faces), and each caller gets its
    own rows back. Nothing waits for company: an idle engine runs a call at once, so joining adds no latency, and
    batches grow with the load. Other attributes are the engine's."""

    def __init__(self, engine, max_batch: int):
        self._inner, self._max_batch = engine, max(1, max_batch)
        self._queue: queue.Queue = queue.Queue()
        self.joined_calls = self.joined_rows = 0   # calls made, and the rows they held
        threading.Thread(target=self._loop, name="cafi-joined", daemon=True).start()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, x: np.ndarray):
        return self._submit("__call__", x)

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """The engine's `run` (every output), joined like a call."""
        return self._submit("run", x)

    def _submit(self, method: str, x: np.ndarray):
        if len(x) == 0:
            return getattr(self._inner, method)(x)
        call = _Call(method, x, threading.Event())
        self._queue.put(call)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _loop(self) -> None:
        waiting: list[_Call] = []   # arrived, not run yet: in arrival order
        while True:
            if not waiting:
                waiting.append(self._queue.get())
            while True:
                try:
                    waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batch, rows, rest = [], 0, []
            for call in waiting:   # the oldest call, and the later ones that fit with it
                if not batch or (call.key == batch[0].key and rows + len(call.x) <= self._max_batch):
                    batch.append(call)
                    rows += len(call.x)
                else:
                    rest.append(call)
            waiting = rest
            self._run(batch, rows)

    def _run(self, batch: list[_Call], rows: int) -> None:
        try:
            result = getattr(self._inner, batch[0].method)(np.concatenate([c.x for c in batch]))
            self.joined_calls += 1
            self.joined_rows += rows
            at = 0
            for call in batch:
                call.result = take_rows(result, at, at + len(call.x))
                at += len(call.x)
        except Exception as e:   # every caller of this call sees the engine's error
            for call in batch:
                call.error = e
        for call in batch:
            call.done.set()
