"""Live sources against a real RTSP server on 127.0.0.1 (GStreamer's rtsp-server), and signals."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from conftest import FACES, FR_MODEL, ROOT, VIDEO, looped_copy, read_rows

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER = Path(__file__).with_name("rtsp_server.py")


def _has_rtsp_server() -> bool:
    probe = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    return Path(SYSTEM_PYTHON).exists() and subprocess.run([SYSTEM_PYTHON, "-c", probe],
                                                           capture_output=True).returncode == 0


needs_rtsp = pytest.mark.skipif(not _has_rtsp_server(), reason="GStreamer RTSP server (gir1.2-gst-rtsp-server-1.0, "
                                                                "python3-gi) not installed; .ci/run installs it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def rtsp_server(port: int, video: Path, *tls_and_user):
    proc = subprocess.Popen([SYSTEM_PYTHON, str(SERVER), str(port), str(video), *map(str, tls_and_user)],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cafi_stream.cli", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


last_stats: dict = {}


def wait_for(condition, timeout: float, what: str, proc=None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"cafi-stream exited ({proc.returncode}) waiting for {what}: {proc.stderr.read()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f" (stats: {last_stats})" if last_stats else ""))


def stats(path: Path) -> dict:
    try:
        last_stats.update(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return dict(last_stats)


def assert_rows_valid(out: Path) -> list[dict]:
    text = (out / "metadata.jsonl").read_text()
    assert text == "" or text.endswith("\n")   # whole lines only
    rows = read_rows(out)
    for row in rows:
        for column in ("file_name", "aligned_file", "masked_file"):
            assert cv2.imread(str(out / row[column])) is not None, row[column]
    return rows


@pytest.fixture(scope="module")
def looped_clip(tmp_path_factory) -> Path:
    """The shared clip 12 times in a row (about 2 minutes), stream-copied."""
    return looped_copy(VIDEO, tmp_path_factory.mktemp("live") / "looped.mp4", 12)


@pytest.fixture(scope="module")
def face_video(tmp_path_factory) -> Path:
    """30 s of one real face (a shared photo, drifting slowly): a track that never ends."""
    photo = cv2.cvtColor(cv2.imread(str(FACES / "obama__obama-480p.jpg")), cv2.COLOR_BGR2RGB)
    photo = cv2.resize(photo, (640, 360 * photo.shape[1] // 640 if photo.shape[1] > 640 else 360))
    dst = tmp_path_factory.mktemp("face") / "face.mp4"
    with av.open(str(dst), "w") as out:
        st = out.add_stream("libx264", rate=30, options={"preset": "ultrafast", "crf": "20"})
        st.width, st.height, st.pix_fmt = 640, 360, "yuv420p"
        canvas = np.zeros((360, 640, 3), np.uint8)
        for i in range(900):
            dx = int(20 * np.sin(i / 40))
            m = np.float32([[1, 0, dx], [0, 1, 0]])
            img = cv2.warpAffine(cv2.resize(photo, (640, 360)), m, (640, 360), dst=canvas.copy())
            for packet in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)
    return dst


def config(tmp_path: Path, **live) -> Path:
    path = tmp_path / "live.toml"
    path.write_text("[live]\n" + "".join(f"{k} = {v}\n" for k, v in live.items()))
    return path


FAST = ("--iqa", "none", "--fr-model", FR_MODEL, "--quiet")


@needs_rtsp
def test_rtsp_ingest_survives_three_server_restarts(looped_clip, tmp_path):
    port = free_port()
    out, st = tmp_path / "out", tmp_path / "stats.json"
    url = f"rtsp://127.0.0.1:{port}/stream"
    server = rtsp_server(port, looped_clip)
    server.__enter__()
    proc = cli(url, "--out", out, "--stats-json", st, "--track-timeout", 1, "--open-timeout", 5,
               "--read-timeout", 5, "--config", config(tmp_path, status_interval=0.5), *FAST)
    try:
        # 1. Tracks are written while the server keeps running.
        wait_for(lambda: (out / "metadata.jsonl").exists() and read_rows(out), 90, "a written track", proc)
        # 2. Kill and restart the server three times; closed tracks stay on disk, valid.
        for i in range(1, 4):
            before = (out / "metadata.jsonl").read_text()
            server.__exit__(None, None, None)
            time.sleep(2)
            assert_rows_valid(out)
            server = rtsp_server(port, looped_clip)
            server.__enter__()
            wait_for(lambda: stats(st).get("reconnects", 0) >= i and stats(st).get("connected"), 60,
                     f"reconnect {i}", proc)
            assert (out / "metadata.jsonl").read_text().startswith(before)
        wait_for(lambda: stats(st).get("processed", 0) > 0 and stats(st).get("processed_fps", 0) > 0, 60,
                 "frames after the last reconnect", proc)
        rows_before_stop = len(read_rows(out))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        server.__exit__(None, None, None)
    rows = assert_rows_valid(out)
    assert len(rows) >= rows_before_stop >= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["live"]["reconnects"] >= 3
    assert summary["interrupted"] is True
    assert not list((out / "live").iterdir())   # open tracks were written, no snapshot left behind


@contextmanager
def silent_listener(hang_up: bool = False):
    """Accepts TCP connections and never sends a byte (the peer that hangs av.open); with `hang_up`, closes each
    at once instead (a peer that never serves a stream, whatever the scheme)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn = sock.accept()[0]
            except OSError:
                continue
            conn.close() if hang_up else held.append(conn)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        sock.close()


def one_line_exit(proc, code):
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert proc.returncode == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_silent_peer_fails_within_open_timeout(tmp_path):
    with silent_listener() as port:
        t0 = time.monotonic()
        proc = cli(f"rtsp://127.0.0.1:{port}/stream", "--open-timeout", 2, "--reconnect-max", 0,
                   "--out", tmp_path / "out", *FAST)
        line = one_line_exit(proc, 3)
        elapsed = time.monotonic() - t0
    assert "2 s" in line and "reconnect-max 0" in line
    assert elapsed < 2 + 4, elapsed   # the open deadline, plus the interpreter's start-up


def test_nothing_listening_gives_up_after_the_cap(tmp_path):
    proc = cli(f"rtsp://127.0.0.1:{free_port()}/stream", "--reconnect-max", 2, "--out", tmp_path / "out", *FAST)
    line = one_line_exit(proc, 3)
    assert "3 attempt" in line and "reconnect-max 2" in line


def test_sigterm_during_a_file_run_writes_the_open_track(face_video, tmp_path):
    out, st = tmp_path / "out", tmp_path / "stats.json"
    proc = cli(face_video, "--out", out, "--stats-json", st, "--config", config(tmp_path, status_interval=0.2),
               "--topk", 3, *FAST)
    wait_for(lambda: stats(st).get("processed", 0) >= 150, 120, "150 processed frames", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["frames"] < 900
    rows = assert_rows_valid(out)
    assert len({r["track_id"] for r in rows}) == 1 and 1 <= len(rows) <= 3   # the one track, still open


def test_loop_source_snapshots_a_track_that_never_ends(face_video, tmp_path):
    out = tmp_path / "out"
    proc = cli(face_video, "--loop", "--out", out, "--config", config(tmp_path, snapshot_interval=1.0), *FAST)
    wait_for(lambda: list((out / "live").glob("track_*.json")) if (out / "live").exists() else False, 60,
             "a best-so-far snapshot", proc)
    snapshot = json.loads(next((out / "live").glob("track_*.json")).read_text())
    assert snapshot and all((out / r["file_name"]).is_file() for r in snapshot)
    assert read_rows(out) == []   # the track has not ended: nothing final yet
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert read_rows(out) and not list((out / "live").iterdir())
