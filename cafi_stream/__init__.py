"""cafi-stream: keep the best-quality faces of every person in a video (CAFI: SER-FIQ filter + IQA ranking)."""

from .config import Config, load_config
from .errors import CafiError, InputError, ModelError

__version__ = "0.1.0"

__all__ = ["CafiError", "Config", "InputError", "ModelError", "load_config", "process", "run", "run_batch"]


def process(source, config=None, **kwargs):
    """Each track's kept faces as a lazy iterator of frozen `TrackResult`s, nothing written; see
    `cafi_stream.pipeline.process`."""
    from .pipeline import process as _process

    return _process(source, config if config is not None else load_config(), **kwargs)


def run(source, config=None, out_dir=None, **kwargs):
    """Process one video source; see `cafi_stream.pipeline.run`."""
    from .pipeline import run as _run

    return _run(source, config if config is not None else load_config(), out_dir=out_dir, **kwargs)


def run_batch(inputs, config=None, out_dir="cafi_dataset", **kwargs):
    """Process many videos into one dataset folder, resumably; see `cafi_stream.batch.run_batch`."""
    from .batch import run_batch as _run_batch

    return _run_batch(list(inputs), config if config is not None else load_config(), out_dir, **kwargs)
