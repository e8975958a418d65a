"""`cafi-stream`: a thin command line over `cafi_stream.pipeline.run`. Heavy libraries load only after parsing."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from .config import FUSIONS, RANKERS
from .errors import CafiError
from .sources import redact

log = logging.getLogger("cafi_stream")


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # Sources are redacted where they are named; this is the net under every message that reaches stderr.
        return redact(f"cafi-stream: {record.levelname.lower()}: {super().format(record)}")


class _Parser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(self._argv, namespace)

    def error(self, message: str):   # one line and exit 2, without argparse's usage block
        known = self._option_string_actions
        unknown = [a for a in getattr(self, "_argv", []) if a.startswith("-") and a not in ("-", "--")
                   and a.split("=", 1)[0] not in known and not self._negative_number_matcher.match(a)]
        if unknown:   # argparse would only say that SOURCE is missing
            message = f"unknown option {unknown[0]}"
            if "." in unknown[0] or "/" in unknown[0]:
                message += f" (a file name that starts with '-' needs ./ in front: ./{unknown[0]})"
        sys.stderr.write(redact(f"cafi-stream: error: {message} (see --help)\n"))
        sys.exit(2)


def build_parser(batch: bool = False) -> argparse.ArgumentParser:
    if batch:
        p = _Parser(prog="cafi-stream batch", description="Build one face dataset from many videos, resumably.")
        p.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="video files, folders, globs, or .txt files listing paths or URLs")
        p.add_argument("--out", required=True, help="dataset folder (rerunning into it resumes)")
        p.add_argument("--workers", type=int, default=1, help="videos processed at once (local processes)")
        p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="run one task per video on a Ray cluster (no ADDRESS: a local one)")
    else:
        p = _Parser(prog="cafi-stream", description="Keep the best-quality face images of every person in a video.")
        p.add_argument("source", help="video file, image, URL or capture device")
        p.add_argument("--out", help="output folder (default cafi_out/<source stem>/); it must be empty or new")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an earlier run's files in --out (other files there are left alone)")
    p.add_argument("--topk", type=int, help="faces kept per track, or per identity with --per identity (default 5)")
    p.add_argument("--config", help="TOML file overlaid on configs/default.toml")
    p.add_argument("--models-dir", help="where model files are found and downloaded to (or $CAFI_MODELS_DIR)")
    p.add_argument("--fr-model", help="face-recognition model: a registry name or an ONNX file (default arcface_r50)")
    p.add_argument("--detector", help="face detector: scrfd_2.5g, yunet, mediapipe, or one of their files "
                                      "(default: configs/default.toml)")
    p.add_argument("--iqa", help="dbcnn (default), any pyiqa no-reference metric, or none (rank by SER-FIQ)")
    p.add_argument("--min-face", type=int, help="least face box side in source pixels to score (default 112)")
    p.add_argument("--min-gap", type=float, help="least seconds between kept faces of one track (default 0.5)")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where torch and ONNX Runtime run")
    p.add_argument("--backend", choices=["auto", "tensorrt", "ort", "torch"],
                   help="inference backend for the scoring networks (default auto: the fastest available)")
    p.add_argument("--ranker", choices=RANKERS,
                   help="how faces are ranked (default cafi; the others are baselines)")
    p.add_argument("--fusion", choices=FUSIONS, help="how cafi combines its signals")
    if not batch:   # one file per run; a batch records its videos in its own folder
        p.add_argument("--scores-out", help="write one JSON line per scored face, with whether it was kept")
    p.add_argument("--exhaustive", action="store_true", default=None,
                   help="score every eligible face with the IQA model (slow; the cascade's reference)")
    ds = p.add_argument_group("dataset")
    ds.add_argument("--per", choices=["track", "identity"], help="keep the top-k per track (default) or per identity")
    ds.add_argument("--identity-threshold", type=float,
                    help="least average embedding cosine between two tracks of one identity (default 0.35)")
    ds.add_argument("--max-similarity", type=float,
                    help="largest embedding cosine between two kept faces of a track (default 1: off)")
    ds.add_argument("--pose-bins", action="store_true", default=None,
                    help="keep the best frontal, left and right face of a track first")
    ds.add_argument("--export", action="append", choices=["parquet"], default=[],
                    help="also write dataset.parquet (every column and the image bytes)")
    live = p.add_argument_group("live sources (rtsp://, http(s)://, /dev/video*, --loop)")
    if not batch:   # a looping file never finishes
        live.add_argument("--loop", action="store_true", default=None,
                          help="play a file as a live source at its native rate, looping")
    live.add_argument("--rtsp-transport", choices=["tcp", "udp"], help="RTSP transport (default tcp)")
    live.add_argument("--open-timeout", type=float, help="seconds a connection may take to open (default 10)")
    live.add_argument("--read-timeout", type=float, help="seconds without data before reconnecting (default 10)")
    live.add_argument("--reconnect-max", type=int,
                      help="failed connection attempts in a row before exiting with code 3 (default: unlimited)")
    live.add_argument("--track-timeout", type=float, help="seconds unseen before a track is closed and written")
    if not batch:
        live.add_argument("--stats-json", help="keep the status figures in this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar, status lines or result line")
    p.add_argument("-v", "--verbose", action="store_true", help="log details and show tracebacks")
    return p


def _print_status(h: dict) -> None:
    state = "" if h["connected"] else " (reconnecting)"
    sys.stderr.write(f"cafi-stream: status: in {h['input_fps']:.1f} fps, processed {h['processed_fps']:.1f} fps, "
                     f"dropped {h['dropped']}, queue {h['queue']}, open tracks {h['open_tracks']}, "
                     f"written {h['tracks_written']}, reconnects {h['reconnects']}{state}\n")
    sys.stderr.flush()


def config_overrides(args: argparse.Namespace) -> dict:
    """{section: {key: value}} for the flags given; a parser that lacks a flag (engines build) just skips it."""
    flags = {"output": {"topk": "topk", "min_gap": "min_gap"}, "faces": {"min_face": "min_face"},
             "fr": {"model": "fr_model"}, "detect": {"model": "detector"}, "iqa": {"name": "iqa"}, "decode": {"max_frames": "max_frames"},
             "runtime": {"device": "device", "models_dir": "models_dir", "backend": "backend"},
             "cascade": {"exhaustive": "exhaustive"}, "rank": {"method": "ranker", "fusion": "fusion"},
             "live": {"loop": "loop", "transport": "rtsp_transport", "open_timeout": "open_timeout",
                      "read_timeout": "read_timeout", "reconnect_max": "reconnect_max"},
             "track": {"max_gap": "track_timeout"},
             "identity": {"per": "per", "threshold": "identity_threshold"},
             "diversity": {"max_similarity": "max_similarity", "pose_bins": "pose_bins"}}
    return {section: {key: getattr(args, flag) for key, flag in keys.items() if getattr(args, flag, None) is not None}
            for section, keys in flags.items()}


def build_engines_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cafi-stream engines build",
                description="Export and compile the scoring engines now, instead of lazily on the first run.")
    p.add_argument("action", choices=["build"])
    for flag in ("--config", "--models-dir", "--fr-model", "--detector", "--iqa"):
        p.add_argument(flag)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backend", choices=["auto", "tensorrt", "ort", "torch"])
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)
    log.propagate = False


_RESUME = "interrupted: finished videos are kept; rerun the same command to resume"


def _guarded(work, verbose: bool, interrupted: str = "interrupted"):
    """(work(), 0), or (None, exit code) after one stderr line: the traceback only with -v. Whatever a library
    prints goes to stderr: stdout carries only the CLI's own result line."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return work(), 0
    except CafiError as e:
        log.error("%s", e)
        return None, e.exit_code
    except KeyboardInterrupt:
        log.error("%s", interrupted)
        return None, 130
    except Exception as e:   # an internal error
        log.debug("traceback", exc_info=True)
        log.error("internal error: %s: %s%s", type(e).__name__, e, "" if verbose else " (run with -v for details)")
        return None, 1


def engines_main(argv: list[str]) -> int:
    args = build_engines_parser().parse_args(argv)
    _setup_logging(args.verbose)

    def work():
        from .backend import engines_dir
        from .config import load_config
        from .pipeline import Models

        models = Models.load(load_config(args.config, config_overrides(args)))
        result = {"engines_dir": str(engines_dir()), "engines": models.engines}
        models.close()
        return result

    result, code = _guarded(work, args.verbose)
    if result is not None:
        print(json.dumps(result))
    return code


def _on_video(quiet: bool):
    def report(source: str, result) -> None:
        if result.error is not None and result.error != "interrupted":
            log.error("%s: %s", source, result.error)
        elif result.summary is not None and not quiet:
            s = result.summary
            sys.stderr.write(f"cafi-stream: done: {source}: {s['frames']} frames, {s['faces_kept']} faces, "
                             f"{s['fps']} fps\n")
    return report


def batch_main(argv: list[str]) -> int:
    args = build_parser(batch=True).parse_args(argv)
    _setup_logging(args.verbose)
    if args.workers < 1:
        build_parser(batch=True).error("--workers must be at least 1")

    def work():
        from .batch import run_batch
        from .config import load_config

        return run_batch(args.inputs, load_config(args.config, config_overrides(args)), args.out, workers=args.workers,
                         ray=args.ray is not None, ray_address=args.ray or None, exports=tuple(args.export),
                         on_video=_on_video(args.quiet))

    r, code = _guarded(work, args.verbose, _RESUME)
    if r is None:
        return code
    if not args.quiet:
        print(json.dumps({"out_dir": str(r.out_dir), "done": len(r.done), "skipped": len(r.skipped),
                          "failed": len(r.failed), "faces": r.faces, "identities": r.identities}))
    if r.interrupted:
        log.error("%s", _RESUME)
        return 130
    return 2 if r.failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["engines"]:
        return engines_main(argv[1:])
    if argv[:1] == ["batch"]:
        return batch_main(argv[1:])
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)

    def work():
        from .config import load_config
        from .pipeline import run

        progress = not args.quiet and sys.stderr.isatty()
        return run(args.source, load_config(args.config, config_overrides(args)), out_dir=args.out, progress=progress,
                   stats_json=args.stats_json, scores_out=args.scores_out, exports=tuple(args.export),
                   on_status=None if args.quiet else _print_status, overwrite=args.overwrite)

    result, code = _guarded(work, args.verbose)
    if result is None:
        return code
    s = result.summary
    if not args.quiet:
        print(json.dumps({"out_dir": str(result.out_dir), "frames": s["frames"], "tracks": s["tracks"],
                          "faces_kept": s["faces_kept"], "identities": s["identities"], "fps": s["fps"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
