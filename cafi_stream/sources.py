"""What a source string is (a file, a URL, a capture device, a live source) and how it may be shown.

The real string is used only to connect. Everything printed or written (logs, summaries, rows, reports, folder
names, the batch manifest) uses `redact(source)`: the user-info of every URL and secret-looking query parameters
are replaced by `***`.
"""

from __future__ import annotations

import re
from pathlib import Path

LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "rtmps://", "http://", "https://", "udp://", "tcp://", "srt://")

# scheme://user:password@host: FFmpeg takes the last '@' before the path ('/', '?' or '#') as the separator.
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#\s]*@")
_SECRET_PARAM = re.compile(
    r"([?&;](?:password|passwd|pass|pwd|passphrase|token|access_token|auth|authorization|key|apikey|api_key|secret"
    r"|signature|sig|session|sessionid|credentials?)=)[^&;#\s'\"]*", re.IGNORECASE)


def is_url(source: str) -> bool:
    return "://" in source


def is_capture_device(source: str) -> bool:
    return source.startswith("/dev/video")


def is_live(source: str) -> bool:
    """Stream URLs and capture devices: sources that do not end by themselves."""
    return source.startswith(LIVE_SCHEMES) or is_capture_device(source)


def redact(text: str) -> str:
    """`text` with every URL credential replaced by ***; text without one comes back unchanged."""
    if "://" not in text:
        return text
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def source_stem(source: str) -> str:
    """A file-system-safe short name for a source (its file stem, or a URL's last path part or host)."""
    shown = redact(source).split("?")[0].split("#")[0].rstrip("/")
    if is_url(shown):
        host, _, path = shown.split("://", 1)[1].split("@")[-1].partition("/")
        stem = Path(path).stem if path else host
    else:
        stem = Path(shown).stem
    return re.sub(r"[^\w.-]+", "_", stem)[:60].strip("._") or "stream"
