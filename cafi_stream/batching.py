"""Micro-batching across faces and frames: a bounded batch and a bounded wait, so that GPU engines see full
batches while a live stream's latency stays bounded."""

from __future__ import annotations

import time
from typing import Callable, Generic, TypeVar

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
