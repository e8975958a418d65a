"""Hostile inputs and outputs through the real CLI: nothing outside --out is deleted or overwritten, no credential
leaks, no earlier run is lost silently, portrait phone videos come out upright, and user errors give one line."""

import http.server
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import av
import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import FACES, FR_MODEL, ROOT, VIDEO, face_analysis, read_rgb, read_rows, run_cli, still_video
from test_bad_input import assert_one_line, remux
from test_live import free_port, needs_rtsp, rtsp_server, silent_listener

FAST = ("--iqa", "none", "--fr-model", FR_MODEL, "--quiet")
PASSWORD = "S3cr3tPw9"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_rows_match_files(out: Path) -> list[dict]:
    """Every image a row names exists, and every image on disk is named by a row; no temporary file is left."""
    rows = read_rows(out)
    named = {row[c] for row in rows for c in ("file_name", "aligned_file", "masked_file")}
    on_disk = {str(p.relative_to(out)) for sub in ("faces", "aligned", "masked") for p in (out / sub).glob("*")}
    assert named == on_disk
    assert not [p for p in out.rglob("*.tmp")]
    return rows


# -- output paths


def test_crafted_output_folder_deletes_and_overwrites_nothing_outside(tmp_path):
    outside = tmp_path / "outside"
    (outside / "faces").mkdir(parents=True)
    victims = {name: f"precious {name}\n".encode() for name in
               ("victim.txt", "passwd", "faces/t000001_f0000001.jpg", "meta.jsonl", "report.html")}
    for name, data in victims.items():
        (outside / name).write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    hostile = [{"file_name": str(outside / "victim.txt")}, {"file_name": "../outside/passwd"},
               {"aligned_file": "faces/../../outside/victim.txt"}, {"masked_file": "/etc/hostname"},
               {"file_name": "masked/../../outside/faces/t000001_f0000001.jpg"}]
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hostile))
    (out / "aligned").symlink_to(outside / "faces")          # our folder name, leading out
    (out / "report.html").symlink_to(outside / "report.html")  # our file name, leading out
    (out / "summary.json").symlink_to(outside / "meta.jsonl")
    (out / "notes.txt").write_text("the user's own file\n")
    etc_hostname = Path("/etc/hostname").read_bytes() if Path("/etc/hostname").exists() else None

    refused = run_cli(VIDEO, "--out", out, *FAST)
    assert_one_line(refused, 2, "--overwrite")
    proc = run_cli(VIDEO, "--out", out, "--topk", 2, "--overwrite", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(outside) == victims
    if etc_hostname is not None:
        assert Path("/etc/hostname").read_bytes() == etc_hostname
    assert (out / "notes.txt").read_text() == "the user's own file\n"
    assert not (out / "aligned").is_symlink() and not (out / "report.html").is_symlink()
    assert assert_rows_match_files(out)


def test_only_names_the_writer_gives_are_ever_deleted(tmp_path):
    from cafi_stream.outdir import IMAGE_DIRS, OutputDir, image_name, snapshot_name

    out = OutputDir(tmp_path)
    names = [image_name(k, 3, 140, live) for k in IMAGE_DIRS for live in (False, True)] + [snapshot_name(3)]
    others = ["faces/holiday.jpg", "notes.txt", "faces/t3_f140.jpg"]
    for name in names + others:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    for name in names + others:
        out.remove_image(name)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(others)


def test_a_rerun_never_removes_an_earlier_run_silently(tmp_path):
    out = tmp_path / "out"
    first = run_cli(VIDEO, "--out", out, "--topk", 2, *FAST)
    assert first.returncode == 0, first.stderr
    before = snapshot(out)
    other = VIDEO.parent / "video_chunk_6s.mp4"
    second = run_cli(other, "--out", out, "--min-face", 40, *FAST)
    assert_one_line(second, 2, "not empty", "--overwrite")
    assert snapshot(out) == before
    (out / "faces" / "mine.jpg").write_bytes(b"not ours")
    third = run_cli(other, "--out", out, "--min-face", 40, "--overwrite", *FAST)
    assert_one_line(third, 0, "replaced an earlier run")
    rows = read_rows(out)
    assert rows and {r["source"] for r in rows} == {str(other)}
    assert (out / "faces" / "mine.jpg").read_bytes() == b"not ours"


def test_single_runs_and_batches_keep_out_of_each_others_folders(tmp_path):
    single, dataset = tmp_path / "single", tmp_path / "dataset"
    (single / "faces").mkdir(parents=True)
    (single / "metadata.jsonl").write_text("")
    (dataset / "videos").mkdir(parents=True)
    (dataset / "manifest.jsonl").write_text("")
    before = snapshot(tmp_path)
    assert_one_line(run_cli("batch", VIDEO, "--out", single, *FAST), 2, "not a batch dataset")
    assert_one_line(run_cli(VIDEO, "--out", dataset, "--overwrite", *FAST), 2, "batch dataset")
    assert snapshot(tmp_path) == before


def test_killed_run_leftovers_are_cleaned_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "cafi_stream.cli", str(VIDEO), "--out", str(out), *map(str, FAST)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "faces").is_dir() and any((out / "faces").iterdir()):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # What a kill between an image and its row leaves: a half-written temporary file and an image with no row.
    for sub in ("faces", "masked"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "faces" / ".cafi-t000099_f0000001.jpg.x1y2.tmp").write_bytes(b"half")
    (out / "masked" / "t000099_f0000001.png").write_bytes(b"no row names me")
    refused = run_cli(VIDEO, "--out", out, *FAST)
    assert_one_line(refused, 2, "--overwrite")
    proc = run_cli(VIDEO, "--out", out, "--topk", 2, "--overwrite", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert_rows_match_files(out)
    assert not (out / ".cafi.lock").exists()


@contextmanager
def tmpfs(mnt: Path, options: str):
    """A tmpfs mounted at `mnt` (needs root; skips elsewhere)."""
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_fails_with_one_line_and_a_summary_that_says_so(tmp_path):
    with tmpfs(tmp_path / "small", "size=400k") as small:   # room for a few faces of the clip, not for all
        out = small / "out"
        proc = run_cli(VIDEO, "--out", out, "--topk", 5, "--min-face", 40, *FAST)
        assert_one_line(proc, 1, "No space left on device")
        assert "internal error" not in proc.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["failed"] is True and "No space left" in summary["error"]
        assert summary["interrupted"] is False
        assert_rows_match_files(out)


def test_read_only_output_folder_is_refused_before_models_load(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        # A missing model would fail at load: the folder is reported first, so nothing was loaded.
        proc = run_cli(VIDEO, "--out", ro / "out", "--fr-model", tmp_path / "missing.onnx", "--iqa", "none")
        assert_one_line(proc, 2, "not writable")


# -- credentials


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def http_server(folder: Path, tls: bool = False):
    handler = lambda *a, **kw: _Quiet(*a, directory=str(folder), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls:
        cert, key = self_signed(folder)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def assert_no_password(proc, out: Path) -> None:
    assert PASSWORD not in proc.stdout and PASSWORD not in proc.stderr, proc.stderr
    for path in out.rglob("*") if out.exists() else []:
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_http_credentials_appear_nowhere(scheme, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    remux(VIDEO, served / "clip.ts", "mpegts")
    out = tmp_path / "out"
    with http_server(served, tls=scheme == "https") as port:
        url = f"{scheme}://viewer:{PASSWORD}@127.0.0.1:{port}/clip.ts?token={PASSWORD}&x=1"
        proc = run_cli(url, "--out", out, "--max-frames", 200, "--topk", 2, "--scores-out", tmp_path / "scores.jsonl",
                       "--stats-json", out.parent / "stats.json", "--iqa", "none", "--fr-model", FR_MODEL, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 200
    assert read_rows(out) and (out / "report.html").exists()
    assert summary["source"].startswith(f"{scheme}://***@127.0.0.1")
    assert_no_password(proc, out)
    for extra in (tmp_path / "scores.jsonl", out.parent / "stats.json"):
        assert PASSWORD.encode() not in extra.read_bytes()


def self_signed(folder: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl (to make a test certificate) is not installed")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@needs_rtsp
@pytest.mark.parametrize("scheme", ["rtsp", "rtsps"])
def test_rtsp_credentials_appear_nowhere(scheme, tmp_path):
    """rtsps: the server speaks TLS and serves the user with this password alone."""
    port = free_port()
    out = tmp_path / "out"
    tls = [*self_signed(tmp_path), "admin", PASSWORD] if scheme == "rtsps" else []
    with rtsp_server(port, VIDEO, *tls):
        if tls:
            wrong = run_cli(f"rtsps://admin:wrong@127.0.0.1:{port}/stream", "--out", tmp_path / "wrong",
                            "--reconnect-max", 0, *FAST)
            assert wrong.returncode == 3 and "401" in wrong.stderr, wrong.stderr
        proc = run_cli(f"{scheme}://admin:{PASSWORD}@127.0.0.1:{port}/stream", "--out", out, "--max-frames", 150,
                       "--topk", 2, "--iqa", "none", "--fr-model", FR_MODEL)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "summary.json").read_text())["frames"] == 150
    assert read_rows(out)
    assert_no_password(proc, out)


@pytest.mark.parametrize("scheme", ["rtsp", "rtsps", "http", "https"])
def test_unreachable_credentialed_source_exits_3_without_the_password(scheme, tmp_path):
    out = tmp_path / "out"
    with silent_listener(hang_up=True) as port:
        proc = run_cli(f"{scheme}://user:{PASSWORD}@127.0.0.1:{port}/cam?password={PASSWORD}", "--out", out,
                       "--reconnect-max", 1, "--open-timeout", 3, *FAST)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr and "***@127.0.0.1" in proc.stderr
    assert_no_password(proc, out)


def test_source_names_are_redacted():
    from cafi_stream.pipeline import default_out_dir
    from cafi_stream.sources import redact

    assert redact(f"rtsp://u:{PASSWORD}@cam:554/live?a=1&pwd={PASSWORD}") == "rtsp://***@cam:554/live?a=1&pwd=***"
    assert redact(f"rtsp://u:p@ss{PASSWORD}@cam/x") == "rtsp://***@cam/x"   # FFmpeg splits at the last '@'
    assert redact("videos/a@b.mp4") == "videos/a@b.mp4"
    assert default_out_dir(f"rtsp://admin:{PASSWORD}@10.0.0.5") == Path("cafi_out/10.0.0.5")


# -- portrait phone video


def test_portrait_phone_video_is_kept_upright(tmp_path):
    """The shared clip stored sideways (turned clockwise), with the display matrix a phone writes to turn it back."""
    phone = tmp_path / "phone.mp4"
    with av.open(str(VIDEO)) as inp, av.open(str(phone), "w") as out:
        st = out.add_stream("libx264", rate=30, options={"preset": "ultrafast", "crf": "18"})
        st.width, st.height, st.pix_fmt = 360, 640, "yuv420p"
        st.set_display_rotation(90)
        for frame in inp.decode(video=0):
            stored = np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), k=-1))
            for packet in st.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)
    out = tmp_path / "out"
    proc = run_cli(phone, "--out", out, "--topk", 3, *FAST)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["video"]["width"], summary["video"]["height"], summary["video"]["rotation"]) == (640, 360, 90)
    rows = read_rows(out)
    assert len(rows) >= 2

    detector = face_analysis()
    upright = 0
    try:
        for row in rows:
            right_eye, left_eye, _, mouth_r, mouth_l = np.asarray(row["landmarks"])
            assert max(right_eye[1], left_eye[1]) < min(mouth_r[1], mouth_l[1]), row["landmarks"]
            x1, y1, x2, y2 = row["bbox"]
            # upright coordinates: the centre is in the 640x360 frame (a square box may reach past its edge)
            assert 0 <= (x1 + x2) / 2 <= 640 and 0 <= (y1 + y2) / 2 <= 360 and x2 - x1 < 360
            crop = read_rgb(out / row["file_name"])
            dets = detector(crop)
            if not len(dets):   # a kept face the detector misses on its own crop (small, turned): landmarks above
                continue
            kp = dets.five[int(np.argmax(dets.side))]   # right eye, left eye, nose, mouth corners
            assert max(kp[0, 1], kp[1, 1]) < kp[2, 1] < min(kp[3, 1], kp[4, 1]), row["file_name"]
            upright += 1
    finally:
        detector.close()
    assert upright >= 2


# -- frames, stills, modes, stdout


def test_max_frames_bounds_a_live_source_and_rejects_negatives(tmp_path):
    out = tmp_path / "out"
    proc = run_cli(VIDEO, "--loop", "--max-frames", 90, "--out", out, *FAST, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "summary.json").read_text())["frames"] == 90
    bad = run_cli(VIDEO, "--max-frames", -1, "--out", tmp_path / "out2", *FAST)
    assert_one_line(bad, 2, "max_frames")
    assert not (tmp_path / "out2").exists()


def test_still_image_and_one_frame_video_keep_their_face(tmp_path):
    photo = FACES / "biden__biden.jpg"
    proc = run_cli(photo, "--out", tmp_path / "photo", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert len(read_rows(tmp_path / "photo")) == 1
    one = still_video(photo, tmp_path / "one.mp4", seconds=0.1, fps=10)
    with av.open(str(one)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 1
    proc = run_cli(one, "--out", tmp_path / "small", *FAST)   # letterboxed: the face is under 112 px
    assert_one_line(proc, 0, "no face kept", "smaller than --min-face 112 px")
    proc = run_cli(one, "--out", tmp_path / "one", "--min-face", 40, *FAST)
    assert proc.returncode == 0, proc.stderr
    assert len(read_rows(tmp_path / "one")) == 1
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((240, 320, 3), 128, np.uint8))
    proc = run_cli(blank, "--out", tmp_path / "blank", *FAST)
    assert_one_line(proc, 0, "no face kept", "no face was detected")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_files_follow_the_umask(umask, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "cafi_stream.cli", str(VIDEO), "--out", str(out), "--topk", "1",
                           *map(str, FAST)], cwd=ROOT, capture_output=True, text=True,
                          umask=umask)   # not preexec_fn, which is unsafe where the test process has threads
    assert proc.returncode == 0, proc.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 5
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p
    for p in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        assert p.stat().st_mode & 0o777 == 0o777 & ~umask, p


def test_stdout_holds_only_the_result_line(tmp_path):
    proc = run_cli(VIDEO, "--iqa", "musiq", "--fr-model", FR_MODEL, "--out", tmp_path / "out",
                   "--models-dir", tmp_path / "models", env={"TORCH_HOME": str(tmp_path / "torch")})
    assert_one_line(proc, 2, "musiq")
    assert proc.stdout == ""


# -- user errors: one line, exit 2, before any model loads


def lone_gemm(path: Path) -> Path:
    w = helper.make_tensor("w", TensorProto.FLOAT, [512, 128], np.zeros(512 * 128, np.float32))
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])], [w])
    onnx.save(helper.make_model(graph), str(path))
    return path


def case_args(case: str, tmp: Path) -> tuple[list, list[str]]:
    """(extra CLI arguments, words the error line must hold) for each user error."""
    missing_model = ["--fr-model", tmp / "missing.onnx"]   # loading it would fail: the error comes first
    if case == "out_is_file":
        (tmp / "file").write_text("x")
        return ["--out", tmp / "file", *missing_model], ["not a folder"]
    if case == "out_in_proc":
        return ["--out", "/proc/cafi-out", *missing_model], ["/proc"]
    if case == "out_in_sys":
        return ["--out", "/sys/cafi-out", *missing_model], ["/sys"]
    if case == "config_is_dir":
        return ["--config", tmp, *missing_model], ["folder"]
    if case == "empty_model":
        (tmp / "empty.onnx").touch()
        return ["--fr-model", tmp / "empty.onnx"], ["empty"]
    if case == "lone_gemm":
        return ["--fr-model", lone_gemm(tmp / "gemm.onnx")], ["not a face-recognition network"]
    if case in ("iqa_size", "box_scale", "jpeg_quality"):
        section, key, value = {"iqa_size": ("faces", "iqa_size", 0), "box_scale": ("detect", "box_scale", -1.0),
                               "jpeg_quality": ("output", "jpeg_quality", 500)}[case]
        (tmp / "c.toml").write_text(f"[{section}]\n{key} = {value}\n")
        return ["--config", tmp / "c.toml", *missing_model], [key]
    if case == "scores_out_is_dir":
        return ["--scores-out", tmp, *missing_model], ["--scores-out", "folder"]
    if case == "stats_json_missing_folder":
        return ["--stats-json", tmp / "nope" / "s.json", *missing_model], ["--stats-json", "does not exist"]
    raise ValueError(case)


CASES = ["out_is_file", "out_in_proc", "out_in_sys", "config_is_dir", "empty_model", "lone_gemm", "iqa_size",
         "box_scale", "jpeg_quality", "scores_out_is_dir", "stats_json_missing_folder"]


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_and_exit_2(case, tmp_path):
    engines = tmp_path / "engines"
    args, words = case_args(case, tmp_path)
    out = [] if "--out" in args else ["--out", tmp_path / "out"]
    proc = run_cli(VIDEO, *out, "--iqa", "none", "--quiet", *args, env={"CAFI_ENGINES_DIR": str(engines)})
    assert_one_line(proc, 2, *words)
    assert not list(engines.glob("fr_*")), "a broken engine was cached"
    assert not (tmp_path / "out").exists()


def test_a_file_name_that_looks_like_an_option(tmp_path):
    proc = run_cli("-video.mp4", "--out", tmp_path / "out", *FAST)
    assert_one_line(proc, 2, "unknown option -video.mp4", "./-video.mp4")
    shutil.copy(VIDEO, tmp_path / "-video.mp4")
    proc = run_cli("--out", tmp_path / "out", "--topk", 1, *FAST, "--", tmp_path / "-video.mp4")
    assert proc.returncode == 0, proc.stderr
