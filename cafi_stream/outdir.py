"""The output folder: its layout, and the only code that creates, replaces or deletes files there.

Files already in the folder are treated as hostile: a path the tool deletes or replaces must resolve inside the
folder (no absolute names, no `..`, no link that leads out), and only files the tool itself names are ever
deleted. A run holds an exclusive lock on the folder, so it can also clean up temporary files that a killed run left.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import InputError, OutputError

log = logging.getLogger(__name__)

METADATA = "metadata.jsonl"
SUMMARY = "summary.json"
REPORT = "report.html"
PARQUET = "dataset.parquet"   # not metadata.parquet: imagefolder would take that for a second metadata file
MANIFEST = "manifest.jsonl"   # marks a batch dataset
LOCK = ".cafi.lock"
# A `serve` folder holds one folder per camera, named after it, and the event spools (camera names cannot start
# with "_").
CAMERA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
EVENTS_DIR = "_events"
TMP_PREFIX, TMP_SUFFIX = ".cafi-", ".tmp"
# Where each encoded crop goes, and its metadata column (file_name is the one `imagefolder` loads).
IMAGE_DIRS = {"context": ("faces", "file_name", ".jpg"), "aligned": ("aligned", "aligned_file", ".png"),
              "masked": ("masked", "masked_file", ".png")}
LIVE_DIR = "live"
RUN_FILES = (METADATA, SUMMARY, REPORT, PARQUET)


# The names the tool gives its images and live snapshots; deletes match them, so they are made here alone.
def image_name(kind: str, track_id: int, frame_index: int, live: bool = False) -> str:
    """faces/t000003_f0000140.jpg, or live/faces_t000003_f0000140.jpg for a snapshot."""
    sub, _, ext = IMAGE_DIRS[kind]
    stem = f"t{track_id:06d}_f{frame_index:07d}{ext}"
    return f"{LIVE_DIR}/{sub}_{stem}" if live else f"{sub}/{stem}"


def snapshot_name(track_id: int) -> str:
    return f"{LIVE_DIR}/track_{track_id:06d}.json"


_CROP = re.compile(r"t\d{6,}_f\d{7,}\.(?:jpg|png)")
_LIVE = re.compile(r"(?:(?:faces|aligned|masked)_t\d{6,}_f\d{7,}\.(?:jpg|png)|track_\d{6,}\.json)")
RUN_DIRS = {**{sub: _CROP for sub, _, _ in IMAGE_DIRS.values()}, LIVE_DIR: _LIVE}
_SYSTEM_DIRS = tuple(Path(p) for p in ("/proc", "/sys", "/dev"))


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()   # what open() would give: mkstemp's 0600 would hide files from other users


def is_tmp(name: str) -> bool:
    return name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX)


@contextlib.contextmanager
def replacing(path: Path):
    """A temporary path beside `path` for a writer that needs a file name (a Parquet writer); renamed over `path`
    when the block ends, removed if it fails."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}{TMP_SUFFIX}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


class AppendOnly:
    """A file this run creates (O_EXCL: a file or a planted link already there is an error, never followed) and
    only appends to, in whole records: a write cut short (disk full) is cut back to the last whole one."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o666)

    def append(self, data: bytes) -> None:
        size = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise

    def close(self) -> None:
        os.close(self._fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: readers never see half a file, and a
    link at `path` is replaced, never followed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def writing(what: Path | str):
    """A failed write (disk full, permissions) becomes one OutputError line that names the file."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot write {what}: {e.strerror or e}") from None


def _under_system_dir(path: Path) -> Path | None:
    real = path.resolve()
    return next((d for d in _SYSTEM_DIRS if real == d or d in real.parents), None)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_file(path: str | Path, flag: str) -> None:
    """A file the user names for the tool to write (--scores-out, --stats-json): a writable place for a file."""
    p = Path(path).expanduser().absolute()
    system = _under_system_dir(p)
    if system is not None:
        raise InputError(f"{flag} {path}: under {system}, which is not a place for files")
    if p.is_dir():
        raise InputError(f"{flag} {path}: is a folder, not a file")
    if not p.parent.is_dir():
        raise InputError(f"{flag} {path}: folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise InputError(f"{flag} {path}: not writable")


class OutputDir:
    """One run's (or one batch's) output folder."""

    def __init__(self, path: str | Path, flag: str = "--out"):
        self.given = Path(path).expanduser()
        self.flag = flag
        self.root = self.given.absolute().resolve()   # a link given as --out is the user's choice: follow it once
        self._lock_fd: int | None = None

    def __str__(self) -> str:
        return str(self.given)

    # -- checks without side effects: they run before anything is opened, created or loaded
    def check(self, overwrite: bool = False, batch: bool = False, serve: bool = False) -> None:
        where = f"{self.flag} {self.given}"
        system = _under_system_dir(self.given.absolute())
        if system is not None:
            raise InputError(f"{where}: under {system}, which is not a place for files")
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"{where}: exists and is not a folder")
        base = _nearest_existing(self.root)
        if not base.is_dir():
            raise InputError(f"{where}: {base} is not a folder")
        if not os.access(base, os.W_OK | os.X_OK):
            raise InputError(f"{where}: {base} is not writable (read-only file system or no permission)")
        if self.root.is_dir():
            self._check_contents(overwrite, batch, serve)

    def _check_contents(self, overwrite: bool, batch: bool, serve: bool = False) -> None:
        names = sorted(e.name for e in self.root.iterdir() if e.name != LOCK and not is_tmp(e.name))
        if not names:
            return
        if serve:   # a `serve` folder: one folder per camera, and the event spools
            other = [e.name for e in self.root.iterdir() if e.name != LOCK and not is_tmp(e.name)
                     and (e.is_symlink() or not e.is_dir() or not (CAMERA_NAME.match(e.name) or e.name == EVENTS_DIR))]
            if other:
                raise InputError(f"{self.flag} {self.given}: holds files that are not a serve folder's "
                                 f"({', '.join(sorted(other)[:4])}); choose an empty or new folder")
            return
        is_batch = MANIFEST in names or set(names) <= {"videos", ".work"}
        if batch and not is_batch:
            raise InputError(f"{self.flag} {self.given}: holds files that are not a batch dataset "
                             f"({', '.join(names[:4])}); choose an empty or new folder")
        if not batch and is_batch:
            raise InputError(f"{self.flag} {self.given}: holds a batch dataset; add videos to it with "
                             f"`cafi-stream batch ... --out {self.given}`, or choose another folder")
        if not batch and not overwrite:
            raise InputError(f"{self.flag} {self.given}: not empty ({', '.join(names[:4])}"
                             f"{', ...' if len(names) > 4 else ''}); pass --overwrite to replace an earlier run's "
                             f"files, or choose another folder")

    # -- claiming: create, lock, clear
    def claim(self, overwrite: bool = False, batch: bool = False, serve: bool = False) -> None:
        """Create and lock the folder, then (re)check it: with `overwrite`, an earlier run's files are deleted
        (only names this tool gives its files); temporary files a killed run left are always removed."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise InputError(f"{self.flag} {self.given}: cannot create it ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{self.flag} {self.given}: another cafi-stream run is writing there") from None
        self._lock_fd = fd
        try:
            self._check_contents(overwrite, batch, serve)
            self._remove_stale_tmp()
            if overwrite and not batch:
                self._clear_run()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):   # unlink first: a waiting run then locks a fresh file
            (self.root / LOCK).unlink()
        os.close(self._lock_fd)
        self._lock_fd = None

    def _remove_stale_tmp(self) -> None:
        for folder in (self.root, *(self.root / d for d in RUN_DIRS)):
            if folder.is_dir() and not folder.is_symlink():
                for entry in folder.iterdir():
                    if is_tmp(entry.name) and not entry.is_dir():
                        entry.unlink()
                        log.info("removed %s, left by a run that was killed", entry)

    def _clear_run(self) -> None:
        """--overwrite: an earlier single run's files go; anything else in the folder stays."""
        removed = 0
        with writing(self.given):
            for name in RUN_FILES:
                path = self.root / name
                if path.is_symlink() or path.is_file():
                    path.unlink()
                    removed += 1
            for sub, pattern in RUN_DIRS.items():
                folder = self.root / sub
                if folder.is_symlink():   # a link named like our folder: the link goes, never what it points at
                    folder.unlink()
                elif folder.is_dir():
                    for entry in folder.iterdir():
                        if pattern.fullmatch(entry.name) and (entry.is_symlink() or entry.is_file()):
                            entry.unlink()
                            removed += 1
        if removed:
            log.warning("%s: replaced an earlier run (%d files removed)", self.given, removed)

    # -- paths
    def inside(self, rel: str | Path) -> Path:
        """`root / rel`, refused unless it stays inside the folder (no absolute name, no `..`, no link out)."""
        rel = Path(rel)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise OutputError(f"refusing path {str(rel)!r}: not a plain path inside {self.given}")
        path = self.root / rel
        real = path.parent.resolve() / path.name
        if self.root != real and self.root not in real.parents:
            raise OutputError(f"refusing path {str(rel)!r}: it leads outside {self.given}")
        return path

    def subdir(self, rel: str | Path) -> Path:
        """A folder of the tool's own inside the output folder (created); a link there that leads out is refused."""
        path = self.inside(rel)
        with writing(path):
            path.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            raise OutputError(f"{path} is a link; refusing to write through it")
        return path

    def remove_tree(self, rel: str | Path) -> Path:
        """Delete a folder of the tool's own (a link there: only the link) and return its path."""
        path = self.inside(rel)
        with writing(path):
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
        return path

    def remove_image(self, rel: str | Path) -> None:
        """Delete one of the tool's own image files, named by a metadata row; any other name is left alone."""
        try:
            path = self.inside(rel)
        except OutputError as e:
            log.warning("%s", e)
            return
        if not (_CROP.fullmatch(path.name) or _LIVE.fullmatch(path.name)):
            log.warning("refusing to delete %s: not a name this tool gives its files", rel)
            return
        with writing(path):
            path.unlink(missing_ok=True)
