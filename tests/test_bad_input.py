"""Bad input through the real CLI: exit code, exactly one stderr line, no traceback."""

import json
from pathlib import Path

import av
import pytest

from conftest import FR_MODEL, VIDEO, read_rows, run_cli

FAST = ("--iqa", "none", "--fr-model", FR_MODEL, "--quiet")


def assert_one_line(proc, code, *words):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def remux(src: Path, dst: Path, fmt: str, options=None) -> None:
    """Copy the video stream into another container without re-encoding."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format=fmt, options=options or {}) as out:
        ist = inp.streams.video[0]
        ost = out.add_stream_from_template(ist)
        for packet in inp.demux(ist):
            if packet.dts is None:
                continue
            packet.stream = ost
            out.mux(packet)


def cut(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


@pytest.mark.parametrize("kind", ["missing", "directory", "text", "empty", "no_moov"])
def test_unreadable_input_exits_2(kind, tmp_path):
    if kind == "missing":
        source = tmp_path / "nope.mp4"
    elif kind == "directory":
        source = tmp_path
    elif kind == "text":
        source = tmp_path / "notes.mp4"
        source.write_text("this is not a video\n" * 50)
    elif kind == "empty":
        source = tmp_path / "empty.mp4"
        source.touch()
    else:   # an mp4 cut short: its index ('moov') is at the end and is lost
        source = cut(VIDEO, tmp_path / "cut.mp4", 0.6)
    proc = run_cli(source, "--out", tmp_path / "out", *FAST)
    assert_one_line(proc, 2, str(source))
    if kind == "no_moov":
        assert "moov" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt,ext,options", [("mpegts", ".ts", None), ("matroska", ".mkv", None),
                                             ("mp4", ".mp4", {"movflags": "faststart"})])
def test_truncated_but_decodable_keeps_what_decodes(fmt, ext, options, tmp_path):
    whole = tmp_path / f"whole{ext}"
    remux(VIDEO, whole, fmt, options)
    source = cut(whole, tmp_path / f"cut{ext}", 0.7)
    out = tmp_path / "out"
    proc = run_cli(source, "--out", out, *FAST)
    assert_one_line(proc, 0, "warning")
    summary = json.loads((out / "summary.json").read_text())
    assert 100 < summary["frames"] < 275
    assert summary["truncated"]
    for row in read_rows(out):
        assert (out / row["file_name"]).is_file()


@pytest.mark.parametrize("args,words", [
    (("--topk", "0"), ["topk"]),
    (("--iqa", "lpips"), ["lpips", "full-reference"]),
    (("--iqa", "no_such_metric"), ["no_such_metric"]),
    (("--fr-model", "/nonexistent/model.onnx"), ["/nonexistent/model.onnx"]),
    (("--detector", "no_such_detector"), ["no_such_detector", "scrfd_2.5g", "mediapipe"]),
    (("--detector", str(FR_MODEL)), ["none of the known", "face detector"]),   # an ONNX file, but no detector
    (("--topk", "many"), ["--topk"]),
])
def test_bad_options_exit_2(args, words, tmp_path):
    base = ["--iqa", "none", "--fr-model", FR_MODEL, "--quiet"]
    proc = run_cli(VIDEO, "--out", tmp_path / "out", *base, *args)
    assert_one_line(proc, 2, *words)


def test_not_an_onnx_model_exits_2(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"\x00garbage" * 100)
    proc = run_cli(VIDEO, "--out", tmp_path / "out", "--iqa", "none", "--fr-model", fake, "--quiet")
    assert_one_line(proc, 2, "ONNX")


def test_batch_missing_input_fails_before_any_work(tmp_path):
    proc = run_cli("batch", VIDEO, tmp_path / "nothing-*.mp4", "--out", tmp_path / "ds", *FAST)
    assert_one_line(proc, 2, "no file matches")
    assert not (tmp_path / "ds").exists()


def test_batch_bad_video_is_reported_and_the_rest_is_kept(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video\n")
    good = VIDEO.parent / "video_chunk_6s.mp4"
    out = tmp_path / "ds"
    proc = run_cli("batch", bad, good, "--out", out, "--min-face", 40, *FAST)
    assert_one_line(proc, 2, "notes.mp4")
    rows = read_rows(out)
    assert rows and {r["source"] for r in rows} == {str(good)}
    summary = json.loads((out / "summary.json").read_text())
    assert [v["status"] for v in summary["videos"]] == ["failed", "done"]


def test_batch_refuses_a_folder_another_batch_is_writing(tmp_path):
    import fcntl

    from cafi_stream.outdir import LOCK

    out = tmp_path / "ds"
    out.mkdir()
    with open(out / LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = run_cli("batch", VIDEO, "--out", out, *FAST)
    assert_one_line(proc, 2, "another cafi-stream run")


def test_every_config_flag_sets_its_config_key():
    """Each flag is declared once, on its config key (`config.option`): every run, batch and engines flag parses
    into that key, takes the key's type and choices, and a wrong value is refused by the same parser."""
    from cafi_stream.cli import build_engines_parser, build_parser, config_overrides
    from cafi_stream.config import choices, cli_options, load_config

    defaults = load_config()
    flags = cli_options()
    assert len(flags) >= 20
    for section, f in flags:
        value = getattr(getattr(defaults, section), f.name)
        options = choices(section, f.name)
        given = options[-1] if options else {"int": 7, "float": 0.25, "str": "x"}.get(f.type)
        argv = [f.metadata["flag"]] if f.type == "bool" else [f.metadata["flag"], str(given)]
        parsers = [build_parser()] + ([] if f.metadata["single"] else [build_parser(batch=True)])
        parsers += [build_engines_parser()] if f.metadata["engines"] else []
        for parser in parsers:
            head = {"cafi-stream": ["in.mp4"], "cafi-stream batch": ["in.mp4", "--out", "o"]}.get(parser.prog, ["build"])
            overrides = config_overrides(parser.parse_args(head + argv))
            expected = True if f.type == "bool" else given
            assert overrides == {section: {f.name: expected}}, (f.metadata["flag"], overrides)
            assert getattr(getattr(load_config(overrides=overrides), section), f.name) == expected
        assert type(value).__name__ == f.type
    with pytest.raises(SystemExit):
        build_parser().parse_args(["in.mp4", "--device", "tpu"])
