"""The scoring stages of a run: SER-FIQ, its rule, IQA (scheduler and micro-batch) and the per-track top-k pools.
Analysed faces go in; each ended track's kept faces come out."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Iterable

import numpy as np

from .batching import MicroBatcher
from .cascade import IqaScheduler, SampleGate
from .config import Config
from .fusion import Centroids, FusionModel, TrackScores, ranking_fusion, signal_vector
from .iqa import IqaModel
from .outdir import writing
from .select import KeptFace, Selector, ScoredFace, SerfiqRule
from .serfiq import SerFiq
from .writer import ScoresLog


def ranker_value(method: str, face: ScoredFace) -> float:
    """A face's quality without an IQA model: a baseline ranker's measure, else SER-FIQ."""
    if method == "sharpness":
        return face.sharpness
    if method == "detector":
        return face.det_score
    if method == "random":   # repeatable: seeded by the face's identity in the video
        return random.Random(f"{face.track_id}:{face.frame_index}").random()
    return face.serfiq   # "serfiq", and "cafi" with --iqa none


def build_selector(cfg: Config, serfiq_min: float, with_iqa: bool) -> Selector:
    """The per-track top-k pools of `cfg`'s ranker: its SER-FIQ rule (`serfiq_min`, the recognition model's
    threshold, where `serfiq.min_score` is "auto"), its fusion and the fusion's fitted model."""
    min_score = serfiq_min if cfg.serfiq.min_score == "auto" else cfg.serfiq.min_score
    rule = SerfiqRule(cfg.serfiq.track_quantile, min_score) if cfg.rank.method == "cafi" else SerfiqRule(0.0)
    fusion = ranking_fusion(cfg.rank, with_iqa)
    model = FusionModel.load(iqa=with_iqa) if fusion == "learned" else None
    return Selector(cfg.output.topk, cfg.output.min_gap, rule, cfg.runtime.pool_factor, fusion=fusion,
                    max_similarity=cfg.diversity.max_similarity, pose_bins=cfg.diversity.pose_bins, model=model,
                    max_drop=cfg.rank.max_drop)


class Scoring:
    """SER-FIQ micro-batch -> SER-FIQ rule -> IQA scheduler -> IQA micro-batch -> top-k pools, for one run.

    With the learned fusion's cascade a face enters its pool once SER-FIQ has scored it (its IQA signal at the
    track's typical value) and again with its IQA score if the scheduler gives it a call: the IQA budget refines
    the ranking instead of deciding which faces may be kept at all. A track that ends (`close`) drains what is
    pending for it, gives its kept faces that never had an IQA call one (`_confirm`), and returns its kept faces.
    Batches wait on the clock of the latest `submit` or `close` (video time for files), or on wall time (`live`).
    """

    def __init__(self, cfg: Config, serfiq: SerFiq, iqa: IqaModel | None, timer, live: bool,
                 scores_out: Path | None = None):
        self.serfiq, self.timer = serfiq, timer
        self.method = cfg.rank.method
        # Baseline rankers rank every scored face by their own measure: no SER-FIQ rule, no IQA.
        self.iqa = iqa if self.method == "cafi" else None
        self.selector = build_selector(cfg, serfiq.spec.serfiq_min, self.iqa is not None)
        model = self.selector.model
        self.scores = ScoresLog(scores_out) if scores_out is not None else None
        self.centroids = Centroids()
        c = cfg.cascade
        self.exhaustive = c.exhaustive
        self.provisional = not c.exhaustive and self.selector.fusion == "learned" and self.iqa is not None
        # Baseline rankers score every sampled face: they are measured against what they see.
        self.gate = SampleGate(c.serfiq_window if self.method == "cafi" and not c.exhaustive else 0.0,
                               TrackScores(model, ("serfiq", "iqa")) if model is not None else None)
        self.scheduler = IqaScheduler(c.iqa_budget, c.iqa_burst, window=max(c.iqa_window, cfg.output.min_gap),
                                      max_age=c.max_age, exhaustive=c.exhaustive,
                                      could_enter=self.selector.could_enter)
        rt = cfg.runtime
        # Files wait for a batch in video time, so batches (and any float differences between batch sizes) are the
        # same on every run and machine; live streams wait in wall time, which bounds their latency.
        clock = None if live else (lambda: self.now)
        self.serfiq_batch = MicroBatcher(self._run_serfiq, rt.max_batch, rt.max_wait_ms, clock=clock)
        self.iqa_batch = MicroBatcher(self._run_iqa, rt.max_batch, rt.max_wait_ms, clock=clock)
        self.now = 0.0

    @property
    def counts(self) -> dict[str, int]:
        """The engines' calls, and the faces each cascade step let through without one."""
        return {"serfiq_calls": self.serfiq_batch.calls, "serfiq_skipped": self.gate.skipped,
                "iqa_calls": self.iqa_batch.calls, "iqa_skipped": self.scheduler.skipped}

    @property
    def open_tracks(self) -> list[int]:
        return self.selector.open_tracks

    def peek(self, track_id: int) -> list[KeptFace]:
        """An open track's best so far."""
        return self.selector.peek(track_id)

    def submit(self, faces: Iterable[ScoredFace], now: float) -> None:
        """A frame's analysed faces, at its time `now`: those the SER-FIQ gate lets through are batched."""
        self.now = now
        for face in faces:
            for due in self.gate.submit(face.track_id, face.pts_time, face):
                self.serfiq_batch.add(due)
        self._pump()

    def close(self, track_id: int, now: float) -> list[KeptFace]:
        """An ended track's kept faces, once everything pending for it is scored."""
        self.now = now
        for face in self.gate.release(track_id):
            self.serfiq_batch.add(face)
        self._pump(flush=True, ending=track_id)
        self._confirm(track_id)
        self.centroids.forget(track_id)
        with self.timer("select"):
            if self.scores is not None:
                threshold, score = self.selector.judge(track_id)
            kept = self.selector.close(track_id)
        if self.scores is not None:
            self.scores.close_track(track_id, kept, threshold, score)
        return kept

    def finish(self, now: float) -> None:
        """Close the pools still open (tracks the caller no longer holds: no result) and the scores log."""
        for track_id in self.open_tracks:
            self.close(track_id, now)
        if self.scores is not None:
            with writing(self.scores.path):
                self.scores.close()

    # -- engines, called by the micro-batchers
    def _run_serfiq(self, faces: list[ScoredFace]) -> list[tuple[float, np.ndarray]]:
        with self.timer("serfiq"):
            r = self.serfiq(np.stack([f.crops.aligned for f in faces]))
        return list(zip(r.scores.tolist(), r.embeddings))

    def _run_iqa(self, faces: list[ScoredFace]) -> list[float]:
        with self.timer("iqa"):
            return self.iqa(np.stack([f.crops.masked for f in faces])).tolist()

    # -- flow
    def _pump(self, flush: bool = False, ending: int | None = None) -> None:
        for face, (score, emb) in (self.serfiq_batch.flush() if flush else self.serfiq_batch.poll()):
            typical = self.centroids.typicality(face.track_id, emb)
            face = dataclasses.replace(face, serfiq=score, embedding=emb, typicality=typical,
                                       signals=signal_vector(score, None, face.measures, typical))
            with self.timer("select"):
                passes = self.selector.passes(face.track_id, score)
            if self.scores is not None:
                self.scores.record(face)
            if self.iqa is None:
                face = dataclasses.replace(face, quality=ranker_value(self.method, face))
                if passes:
                    self.selector.offer(face)
                if self.scores is not None:
                    self.scores.update(face)
                continue
            # The filter rule needs no IQA for faces it drops; zsum/zmin and the exhaustive reference score them all.
            if not (passes or self.exhaustive or self.selector.fusion != "filter"):
                continue
            if not self.exhaustive:
                face = dataclasses.replace(face, score=score, proxy=self.selector.proxy(face))
                self.selector.offer_fallback(face)
                if self.provisional and passes:
                    self.selector.offer(face, provisional=True)
            self.scheduler.submit(face.track_id, face.pts_time, face.proxy, face)
        if self.iqa is None:
            return
        for face in self.scheduler.due(self.now, track_id=ending):
            self.iqa_batch.add(face)
        for face, value in (self.iqa_batch.flush() if flush else self.iqa_batch.poll()):
            self._scored_iqa(face, value)

    def _scored_iqa(self, face: ScoredFace, value: float) -> None:
        quality = self.iqa.oriented(value)
        face = dataclasses.replace(face, iqa=value, quality=quality,
                                   signals=signal_vector(face.serfiq, quality, face.measures, face.typicality))
        with self.timer("select"):
            self.selector.offer(face, seen=self.provisional)
        if self.scores is not None:
            self.scores.update(face)

    def _confirm(self, track_id: int) -> None:
        """Before a track's top-k is final, give its kept faces that never had an IQA call one, and choose again:
        every kept face is judged by both networks. Each round scores faces that had no IQA call, so the pool's
        size bounds the rounds."""
        for _ in range(self.selector.capacity if self.provisional else 0):
            missing = [k.face for k in self.selector.peek(track_id) if k.face.iqa is None]
            if not missing:
                return
            for face in missing:
                self.iqa_batch.add(face)
            for face, value in self.iqa_batch.flush():
                self._scored_iqa(face, value)
