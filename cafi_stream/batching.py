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
    """Rows a:b of an engine's result: an array, or a frozen dataclass of arrays (serfiq.SerFiqResult)."""
    if isinstance(result, np.ndarray):
        return result[a:b]
    return dataclasses.replace(result, **{f.name: getattr(result, f.name)[a:b] for f in dataclasses.fields(result)})


class JoinedEngine:
    """One engine shared by many threads (`serve`'s cameras): the calls that arrive while the engine is busy are
    joined into its next call (up to `max_batch` rows), and each caller gets its own rows back. Nothing waits for
    company: an idle engine runs a call at once, so joining adds no latency, and batches grow with the load.
    Other attributes are the engine's."""

    def __init__(self, engine, max_batch: int):
        self._inner, self._max_batch = engine, max(1, max_batch)
        self._queue: queue.Queue = queue.Queue()
        self.joined_calls = self.joined_rows = 0   # calls made, and the rows they held
        threading.Thread(target=self._loop, name="cafi-joined", daemon=True).start()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, x: np.ndarray):
        if len(x) == 0:
            return self._inner(x)
        done, box = threading.Event(), {}
        self._queue.put((x, done, box))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _loop(self) -> None:
        while True:
            pending = [self._queue.get()]
            while sum(len(p[0]) for p in pending) < self._max_batch:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                result = self._inner(np.concatenate([p[0] for p in pending]))
                self.joined_calls += 1
                self.joined_rows += sum(len(p[0]) for p in pending)
                at = 0
                for x, _, box in pending:
                    box["result"] = take_rows(result, at, at + len(x))
                    at += len(x)
            except Exception as e:   # every caller of this call sees the engine's error
                for _, _, box in pending:
                    box["error"] = e
            for _, done, _ in pending:
                done.set()
