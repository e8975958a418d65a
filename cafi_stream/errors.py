"""Errors that end a run with one line on stderr instead of a traceback."""


class CafiError(Exception):
    """An expected failure; `exit_code` is what the CLI returns."""

    exit_code = 1


class InputError(CafiError):
    """Bad input or usage: a missing, unreadable or non-video source, or a bad option."""

    exit_code = 2


class ModelError(CafiError):
    """A model file is missing, cannot be downloaded, fails its checksum, or has an unsupported shape."""

    exit_code = 2


class StreamError(CafiError):
    """A live source stayed unreachable past the reconnect cap."""

    exit_code = 3


class OutputError(CafiError):
    """Writing the results failed: the disk is full, a folder became unwritable, or a path leads outside --out."""

    exit_code = 1
