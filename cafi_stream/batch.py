"""`cafi-stream batch`: many videos into one face dataset, resumable, on a local process pool or a Ray cluster.

OUT/
  videos/<key>/     one finished video: faces/ aligned/ masked/ video.jsonl summary.json
  .work/<key>/      a video in progress (moved to videos/ when it finishes; cleared by the next run)
  manifest.jsonl    one line per finished video: its source fingerprint and the config hash it was made with
  metadata.jsonl    every finished video's rows (paths relative to OUT, `video`, global `identity_id`)
  report.html, dataset.parquet (--export parquet), summary.json

A video is committed (moved, then recorded in the manifest) only when it has finished, so a run killed at any point
redoes at most the videos that were in progress, and the dataset files are always rebuilt from committed videos.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__
from .config import Config
from .dataset import finalize
from .errors import CafiError, InputError
from .outdir import LIVE_DIR, MANIFEST, METADATA, SUMMARY, OutputDir, atomic_write, writing
from .rows import FaceRow, read_face_rows, read_jsonl
from .sources import is_live, is_url, redact, source_stem

log = logging.getLogger(__name__)

VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".m2ts", ".mts", ".flv", ".wmv", ".mpg",
              ".mpeg", ".3gp", ".ogv"}
LIST_EXTS = {".txt", ".lst", ".list"}
VIDEO_ROWS = "video.jsonl"   # a batch video's rows; only the dataset-level metadata.jsonl is an imagefolder index
HEAD_BYTES = 4 << 20
MERGE_INTERVAL = 60.0   # seconds between rebuilds of the dataset files while a batch runs (and once at its end)
# Sections that change what a video's own output is. [identity] and the exports only change the merge, which is
# redone on every run; [live] and [runtime] change how fast, not what.
_VIDEO_SECTIONS = ("output", "decode", "detect", "track", "faces", "fr", "serfiq", "rank", "diversity", "iqa",
                   "cascade")


@dataclass(frozen=True)
class Job:
    source: str
    key: str            # its folder under videos/
    fingerprint: tuple  # (size, mtime_ns, sha256 of the first 4 MiB) of a file; (redacted url,) of a URL

    @property
    def name(self) -> str:
        """The source as it may be shown and recorded: credentials redacted."""
        return redact(self.source)


@dataclass
class VideoResult:
    key: str
    summary: dict | None = None
    error: str | None = None


def expand_inputs(items: list[str]) -> list[str]:
    """Files, directories (their videos, recursively), globs, and text files listing paths or URLs (one per line,
    # comments; relative paths are relative to the list). In order, each source once."""
    out: list[str] = []

    def add(item: str, where: Path | None = None) -> None:
        if is_url(item) or is_live(item):
            out.append(item)
            return
        path = Path(item).expanduser()
        if where is not None and not path.is_absolute():
            path = where / path
        if any(c in item for c in "*?["):
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise InputError(f"no file matches {item}")
            for m in matches:
                if Path(m).is_file() and Path(m).suffix.lower() not in LIST_EXTS:
                    out.append(str(Path(m).resolve()))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS)
            if not found:
                log.warning("%s: no videos in this folder", item)
            out.extend(str(p.resolve()) for p in found)
        elif path.suffix.lower() in LIST_EXTS and path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    add(line, path.parent)
        elif path.is_file():
            out.append(str(path.resolve()))
        else:
            raise InputError(f"input not found: {redact(item)}")

    for item in items:
        add(item)
    if not out:
        raise InputError("no videos to process")
    return list(dict.fromkeys(out))


def video_key(source: str) -> str:
    return f"{source_stem(source)}-{hashlib.sha1(redact(source).encode()).hexdigest()[:8]}"


def fingerprint(source: str) -> tuple:
    if is_url(source) or is_live(source):
        return (redact(source),)
    st = os.stat(source)
    with open(source, "rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
    return (st.st_size, st.st_mtime_ns, head)


def config_hash(cfg: Config) -> str:
    d = cfg.to_dict()
    return hashlib.sha256(json.dumps({k: d[k] for k in _VIDEO_SECTIONS}, sort_keys=True).encode()).hexdigest()[:16]


class Manifest:
    """Append-only record of finished videos; the last line of a key wins, a torn last line is ignored."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / MANIFEST
        self.entries: dict[str, dict] = {}
        for row in read_jsonl(self.path):
            self.entries[row["key"]] = row

    def done(self, job: Job, chash: str, videos: Path) -> bool:
        e = self.entries.get(job.key)
        return (e is not None and tuple(e["fingerprint"]) == job.fingerprint and e["config"] == chash
                and (videos / job.key / VIDEO_ROWS).is_file())

    def compact(self) -> None:
        with writing(self.path):
            atomic_write(self.path, "".join(json.dumps(e) + "\n" for e in self.entries.values()).encode())

    def record(self, entry: dict) -> None:
        self.entries[entry["key"]] = entry
        with writing(self.path), open(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW),
                                      "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())


# -- workers: each process (or Ray actor) loads its models once and runs videos into OUT/.work/<key>/

_models = None


def _init_worker(cfg: Config, random_dbcnn: bool, threads: int) -> None:
    global _models
    import torch

    from .pipeline import Models

    if threads:
        torch.set_num_threads(threads)
    _models = Models.load(cfg, random_dbcnn=random_dbcnn)


def process_video(job: Job, cfg: Config, work_dir: str, models=None) -> VideoResult:
    """Run one video into `work_dir`/<key>; its rows end in video.jsonl. Errors come back as values."""
    from .pipeline import run

    out = Path(work_dir) / job.key
    shutil.rmtree(out, ignore_errors=True)
    try:
        result = run(job.source, cfg, out_dir=out, models=models or _models, finalize=False)
    except CafiError as e:
        return VideoResult(job.key, error=str(e))
    if result.summary.get("interrupted"):
        return VideoResult(job.key, error="interrupted")
    (out / METADATA).replace(out / VIDEO_ROWS)
    shutil.rmtree(out / LIVE_DIR, ignore_errors=True)
    return VideoResult(job.key, summary=result.summary)


def _serial_run(todo: list[Job], cfg: Config, work: Path, random_dbcnn: bool, commit, stop) -> None:
    from .pipeline import Models

    models = Models.load(cfg, random_dbcnn=random_dbcnn)
    try:
        for job in todo:
            commit(job, process_video(job, cfg, str(work), models))
            if stop():
                break
    finally:
        models.close()


def _pool_run(todo: list[Job], cfg: Config, work: Path, workers: int, random_dbcnn: bool, commit) -> None:
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(cfg, random_dbcnn, threads)) as pool:
        futures = {pool.submit(process_video, job, cfg, str(work)): job for job in todo}
        try:
            for fut in as_completed(futures):
                commit(futures[fut], fut.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


class _RayWorker:
    """A Ray actor: models loaded once, then one call per video."""

    def __init__(self, cfg: Config, random_dbcnn: bool):
        self.cfg = cfg
        _init_worker(cfg, random_dbcnn, 0)

    def process(self, job: Job, work_dir: str) -> VideoResult:
        return process_video(job, self.cfg, work_dir)


def _ray_run(todo: list[Job], cfg: Config, work: Path, address: str | None, workers: int, random_dbcnn: bool,
             commit) -> None:
    """One task per video on a Ray cluster (`address`; None: the running or a new local one). Nodes must see the
    inputs and OUT at the same paths (shared storage)."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'cafi-stream[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    resources = ray.cluster_resources()
    gpu = cfg.runtime.device == "cuda" or (cfg.runtime.device == "auto" and resources.get("GPU", 0) >= 1)
    n = workers or max(1, int(resources.get("GPU", 1) if gpu else resources.get("CPU", 1)))
    actor = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_RayWorker)
    actors = [actor.remote(cfg, random_dbcnn) for _ in range(min(n, len(todo)))]
    pool = ActorPool(actors)
    by_key = {j.key: j for j in todo}
    try:
        for result in pool.map_unordered(lambda a, job: a.process.remote(job, str(work)), todo):
            commit(by_key[result.key], result)
    finally:
        for a in actors:
            ray.kill(a)


@dataclass
class BatchResult:
    out_dir: Path
    done: list[str]
    skipped: list[str]
    failed: dict[str, str]   # source -> why (sources as given: print them through redact)
    faces: int
    identities: int
    interrupted: bool


def run_batch(inputs: list[str], cfg: Config, out_dir: str | Path, workers: int = 1, ray: bool = False,
              ray_address: str | None = None, exports: tuple[str, ...] = (), random_dbcnn: bool = False,
              on_video: Callable[[str, VideoResult], None] | None = None) -> BatchResult:
    """Process every input not already finished with this config into `out_dir`, then rebuild the dataset files.
    `on_video(source, result)` is called as each video finishes."""
    out = OutputDir(out_dir)
    out.check(batch=True)
    sources = expand_inputs(inputs)
    jobs = [Job(s, video_key(s), fingerprint(s)) for s in sources]
    chash = config_hash(cfg)
    out.claim(batch=True)
    try:
        return _run_claimed(out, jobs, cfg, chash, workers, ray, ray_address, exports, random_dbcnn, on_video)
    finally:
        out.release()


def _run_claimed(out: OutputDir, jobs: list[Job], cfg: Config, chash: str, workers: int, ray: bool,
                 ray_address: str | None, exports: tuple[str, ...], random_dbcnn: bool, on_video) -> BatchResult:
    videos, work = out.subdir("videos"), out.subdir(".work")
    out.remove_tree(".work")   # what a killed run left half done
    work.mkdir()
    manifest = Manifest(out.root)
    manifest.compact()
    todo = [j for j in jobs if not manifest.done(j, chash, videos)]
    pending = {j.key for j in todo}
    skipped = [j.source for j in jobs if j.key not in pending]
    if skipped:
        log.info("%d of %d videos already done with this config", len(skipped), len(jobs))
    done: list[str] = []
    failed: dict[str, str] = {}
    interrupted = False
    last_merge = time.monotonic()

    def merge(exports=()) -> list[dict]:
        nonlocal last_merge
        last_merge = time.monotonic()
        return _merge(out, [j for j in jobs if manifest.done(j, chash, videos)], cfg, exports)

    def commit(job: Job, result: VideoResult) -> None:
        nonlocal interrupted
        if result.error == "interrupted":
            interrupted = True
        elif result.error is not None:
            failed[job.source] = result.error
        else:
            final = out.remove_tree(f"videos/{job.key}")   # made with another config or an older file: replaced
            with writing(final):
                (work / job.key).replace(final)
                result.summary["out_dir"] = str(final)
                atomic_write(final / SUMMARY, (json.dumps(result.summary, indent=2) + "\n").encode())
            manifest.record({"key": job.key, "source": job.name, "fingerprint": list(job.fingerprint),
                             "config": chash, "faces": len(read_jsonl(final / VIDEO_ROWS)),
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            done.append(job.source)
            if time.monotonic() - last_merge >= MERGE_INTERVAL:   # the dataset files follow a long batch
                merge()
        if on_video is not None:
            on_video(job.name, result)

    try:
        if todo and ray:
            _ray_run(todo, cfg, work, ray_address, workers if workers > 1 else 0, random_dbcnn, commit)
        elif todo and workers > 1 and len(todo) > 1:
            _pool_run(todo, cfg, work, min(workers, len(todo)), random_dbcnn, commit)
        elif todo:
            _serial_run(todo, cfg, work, random_dbcnn, commit, stop=lambda: interrupted)
    finally:   # also after Ctrl-C: the dataset files show every committed video
        rows = merge(exports)
        manifest.compact()
    summary = {"version": __version__, "out_dir": str(out), "config_hash": chash, "config": cfg.to_dict(),
               "videos": [{"source": j.name, "key": j.key,
                           "status": "failed" if j.source in failed else "done" if j.source in done
                           else "skipped" if j.source in skipped else "pending",
                           "error": failed.get(j.source)} for j in jobs],
               "faces": len(rows), "identities": len({r.identity_id for r in rows})}
    with writing(out.root / SUMMARY):
        atomic_write(out.root / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    out.remove_tree(".work")
    return BatchResult(out.given, done, skipped, failed, summary["faces"], summary["identities"], interrupted)


def _merge(out: OutputDir, jobs: list[Job], cfg: Config, exports: tuple[str, ...]) -> list[FaceRow]:
    """The dataset files from the committed videos, in input order: paths made relative to OUT."""
    rows = [dataclasses.replace(row.in_folder(f"videos/{job.key}"), video=job.key)
            for job in jobs for row in read_face_rows(out.root / "videos" / job.key / VIDEO_ROWS)]
    return finalize(out, rows, cfg, exports, title=f"{len(jobs)} videos")
