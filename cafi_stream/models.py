"""Model registry, local model cache and checksummed downloads."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

log = logging.getLogger(__name__)

# A mirror tried before each model's own URLs: `$CAFI_MODEL_MIRROR/<file name>` (for air-gapped sites).
MIRROR_ENV = "CAFI_MODEL_MIRROR"
MODELS_DIR_ENV = "CAFI_MODELS_DIR"
# Read-only folders searched after the models folder, as PATH is (a site's shared model store).
MODEL_PATH_ENV = "CAFI_MODEL_PATH"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    file_name: str
    urls: tuple[str, ...] = ()
    # Full sha256, or a prefix of it where that is all the publisher gives (pyiqa puts 8 hex digits in file names).
    sha256: str = ""
    # Face-recognition input contract: channel order and (pixel - mean) / std.
    channel_order: str = "RGB"
    mean: float = 127.5
    std: float = 127.5
    # SER-FIQ threshold calibrated for this model (None: only the per-track rule applies).
    serfiq_min: float | None = None
    licence: str = "unknown"


FR_MODELS: dict[str, ModelSpec] = {
    # insightface buffalo_l ArcFace R50 (WebFace600K). insightface feeds it RGB, (x - 127.5) / 127.5.
    "arcface_r50": ModelSpec(
        name="arcface_r50",
        file_name="w600k_r50.onnx",
        urls=(
            "https://huggingface.co/public-data/insightface/resolve/main/models/buffalo_l/w600k_r50.onnx",
            "https://huggingface.co/deepghs/insightface/resolve/main/buffalo_l/w600k_r50.onnx",
        ),
        sha256="4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43",
        licence="non-commercial research only (insightface model zoo)",
    ),
    # PaddleX face_feature MobileFaceNet; BGR separates identities slightly better (../shared/data/README.md).
    "mobilefacenet_paddlex_128d": ModelSpec(
        name="mobilefacenet_paddlex_128d",
        file_name="mobilefacenet_paddlex_128d.onnx",
        sha256="6ced4e0c36abba9dd24b48d725f7dbb94089f75b3d3445d3d67b85157cb64743",
        channel_order="BGR",
        licence="Apache-2.0 (PaddleX)",
    ),
}

_PYIQA_WEIGHTS = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"
_PYIQA_RELEASE = "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/"


def _pyiqa_weights(name: str, file_name: str) -> ModelSpec:
    return ModelSpec(name=name, file_name=file_name, urls=(_PYIQA_WEIGHTS + file_name, _PYIQA_RELEASE + file_name),
                     sha256=file_name.rsplit("-", 1)[1].split(".")[0],
                     licence="non-commercial (DBCNN weights, through pyiqa: PolyForm-Noncommercial)")


DBCNN_CHECKPOINTS: dict[str, ModelSpec] = {
    "koniq": _pyiqa_weights("dbcnn_koniq", "DBCNN_KonIQ10k-2de81c0a.pth"),
    "livec": _pyiqa_weights("dbcnn_livec", "DBCNN_LIVEC-83f6dad3.pth"),
    "csiq": _pyiqa_weights("dbcnn_csiq", "DBCNN_CSIQ-8677d071.pth"),
    "tid2013": _pyiqa_weights("dbcnn_tid2013", "DBCNN_TID2013-485d021d.pth"),
    "live": _pyiqa_weights("dbcnn_live", "DBCNN_LIVE-97262bf4.pth"),
}


def default_models_dir(configured: str = "") -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(MODELS_DIR_ENV):
        return Path(os.environ[MODELS_DIR_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "cafi-stream" / "models"


def pyiqa_cache_dir() -> Path:
    """Where pyiqa itself caches weights (torch hub dir / pyiqa), so a user's existing download is reused."""
    hub = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                       "torch")
    return Path(hub) / "hub" / "pyiqa"


def sha256_of(path: Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime): start-up asks for a large model's several times."""
    st = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checksum_ok(digest: str, expected: str) -> bool:
    return not expected or digest.startswith(expected.lower())


def resolve(spec: ModelSpec, models_dir: Path, search: tuple[Path, ...] = (), download: bool = True) -> Path:
    """Return a verified local copy of `spec`: from `models_dir`, then `search`, then $CAFI_MODEL_PATH's folders,
    else downloaded into `models_dir`."""
    shared = tuple(Path(p).expanduser() for p in os.environ.get(MODEL_PATH_ENV, "").split(os.pathsep) if p)
    for folder in (models_dir, *search, *shared):
        path = folder / spec.file_name
        if path.is_file():
            # Downloads are verified before they get this name, so a mismatch here is a file the user put there
            # (a fine-tuned checkpoint, say): use it, but say so.
            if spec.sha256 and not _checksum_ok(sha256_of(path), spec.sha256):
                log.warning("%s is not the published %s (sha256 differs); using it anyway", path, spec.name)
            return path
    urls = list(spec.urls)
    if os.environ.get(MIRROR_ENV):
        urls.insert(0, os.environ[MIRROR_ENV].rstrip("/") + "/" + spec.file_name)
    where = f"put {spec.file_name} in {models_dir}/ (or pass --models-dir DIR / set ${MODELS_DIR_ENV})"
    if not download or not urls:
        raise ModelError(f"model file {spec.file_name} not found: {where}")
    errors = []
    for url in urls:
        try:
            return _download(url, spec, models_dir)
        except (OSError, urllib.error.URLError, ValueError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
            log.debug("download failed: %s", errors[-1])
    raise ModelError(f"model file {spec.file_name} not found and could not be downloaded "
                     f"({errors[-1]}): download it from {spec.urls[0] if spec.urls else urls[0]} and {where}")


def _download(url: str, spec: ModelSpec, models_dir: Path) -> Path:
    models_dir.mkdir(parents=True, exist_ok=True)
    log.warning("downloading %s from %s", spec.file_name, url)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=models_dir, prefix=f".{spec.file_name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            for block in iter(lambda: resp.read(1 << 20), b""):
                h.update(block)
                out.write(block)
        if not _checksum_ok(h.hexdigest(), spec.sha256):
            raise ValueError(f"checksum mismatch (sha256 {h.hexdigest()[:16]}..., expected {spec.sha256[:16]}...)")
        final = models_dir / spec.file_name
        os.replace(tmp, final)
        return final
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_named(model: str, registry: dict[str, ModelSpec], models_dir: Path, kind: str,
                  must_be_known: bool = False) -> tuple[Path, ModelSpec]:
    """`model` is a registry name or a path. A path whose file name or checksum is in the registry takes that
    entry; any other file gets a plain spec, or an error where only registered models can be used."""
    if model in registry:
        spec = registry[model]
        return resolve(spec, models_dir), spec
    path = Path(model).expanduser()
    known = ", ".join(registry)
    if not path.is_file():
        raise ModelError(f"{kind} model '{model}' is neither a file nor a known model ({known})")
    if path.stat().st_size == 0:
        raise ModelError(f"{kind} model {model}: empty file")
    digest = sha256_of(path)
    for spec in registry.values():
        if digest == spec.sha256 or path.name == spec.file_name:
            return path, spec
    if must_be_known:
        raise ModelError(f"{kind} model {model} is none of the known ones ({known})")
    return path, ModelSpec(name=path.stem, file_name=path.name, sha256=digest)


def resolve_fr_model(model: str, models_dir: Path) -> tuple[Path, ModelSpec]:
    """A registered face-recognition model's input contract, or the defaults (RGB, (x - 127.5) / 127.5)."""
    return resolve_named(model, FR_MODELS, models_dir, "face-recognition")
