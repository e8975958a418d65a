"""`cafi-stream`: a thin command line over `cafi_stream.pipeline.run`. Heavy libraries load only after parsing."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from .errors import CafiError, InputError
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
    p.add_argument("--config", help="TOML file overlaid on configs/default.toml")
    if not batch:   # one file per run; a batch records its videos in its own folder
        p.add_argument("--scores-out", help="write one JSON line per scored face, with whether it was kept")
    groups = {"": p, "dataset": p.add_argument_group("dataset"),
              "live": p.add_argument_group("live sources (rtsp://, http(s)://, /dev/video*, --loop)")}
    _add_config_flags(groups, lambda meta: not (batch and meta["single"]))
    groups["dataset"].add_argument("--export", action="append", choices=["parquet"], default=[],
                                   help="also write dataset.parquet (every column and the image bytes)")
    if not batch:
        groups["live"].add_argument("--stats-json", help="keep the status figures in this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar, status lines or result line")
    p.add_argument("-v", "--verbose", action="store_true", help="log details and show tracebacks")
    return p


def _print_status(h: dict) -> None:
    state = "" if h["connected"] else " (reconnecting)"
    sys.stderr.write(f"cafi-stream: status: in {h['input_fps']:.1f} fps, processed {h['processed_fps']:.1f} fps, "
                     f"dropped {h['dropped']}, queue {h['queue']}, open tracks {h['open_tracks']}, "
                     f"written {h['tracks_written']}, reconnects {h['reconnects']}{state}\n")
    sys.stderr.flush()


def _add_config_flags(groups: dict, wanted) -> None:
    """A flag for each config key declared as one (`config.option`) whose metadata `wanted` accepts; its help
    ends with the packaged default."""
    from .config import choices, cli_options, load_config

    defaults = load_config()
    for section, f in cli_options():
        meta = f.metadata
        if not wanted(meta):
            continue
        dest = f"{section}.{f.name}"
        if f.type == "bool":
            groups[meta["group"]].add_argument(meta["flag"], dest=dest, action="store_true", default=None,
                                               help=meta["help"])
            continue
        default = getattr(getattr(defaults, section), f.name)
        groups[meta["group"]].add_argument(meta["flag"], dest=dest, type={"int": int, "float": float}.get(f.type, str),
                                           choices=choices(section, f.name),
                                           metavar=None if choices(section, f.name) else
                                           meta["flag"].lstrip("-").upper().replace("-", "_"),
                                           help=(meta["help"] + (f" (default {default!r})" if default != "" else ""))
                                           .replace("%", "%%"))


def config_overrides(args: argparse.Namespace) -> dict:
    """{section: {key: value}} for the config flags given (`_add_config_flags`)."""
    out: dict[str, dict] = {}
    for dest, value in vars(args).items():
        section, dot, key = dest.partition(".")
        if dot and value is not None:
            out.setdefault(section, {})[key] = value
    return out


def build_engines_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cafi-stream engines build",
                description="Export and compile the scoring engines now, instead of lazily on the first run.")
    p.add_argument("action", choices=["build"])
    p.add_argument("--config", help="TOML file overlaid on configs/default.toml")
    _add_config_flags({"": p}, lambda meta: meta["engines"])
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


def build_serve_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cafi-stream serve",
                description="Many live cameras in one process: best shots written per camera and published as events.")
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="camera URLs (or files with --loop)")
    p.add_argument("--cameras", help="TOML file of [[camera]] tables (name, url, run options); reread on SIGHUP")
    p.add_argument("--out", required=True, help="service folder: OUT/<camera>/<session>/ per camera")
    p.add_argument("--http", default="127.0.0.1:8080", help="HOST:PORT of /metrics, /healthz, the camera API and the "
                   "page (port 0: any free port; 'off': none)")
    p.add_argument("--token", help="needed by the camera API, and by every endpoint but /healthz once set")
    p.add_argument("--events", help="jsonl:FILE, or - for stdout: one JSON line per event")
    p.add_argument("--webhook", help="POST each event to this http(s) URL (spooled, retried with backoff)")
    p.add_argument("--mqtt", help="publish each event to mqtt://HOST[:PORT]/TOPIC (spooled, retried)")
    p.add_argument("--event-images", action="store_true", help="events carry their crop files (base64)")
    p.add_argument("--config", help="TOML file overlaid on configs/default.toml")
    groups = {"": p, "dataset": p.add_argument_group("dataset"),
              "live": p.add_argument_group("live sources (rtsp://, http(s)://, /dev/video*, --loop)")}
    _add_config_flags(groups, lambda meta: True)
    p.add_argument("-v", "--verbose", action="store_true", help="log details and show tracebacks")
    return p


def serve_main(argv: list[str]) -> int:
    import os
    import signal
    import threading

    args = build_serve_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if not args.verbose:
        logging.getLogger("cafi_stream.serve").setLevel(logging.INFO)
    stop, reload = threading.Event(), threading.Event()

    def work():
        from .serve import Service, from_sources, read_cameras, unique
        from .web import WebServer, parse_bind

        def specs():
            return unique(from_sources(args.sources) + (read_cameras(args.cameras) if args.cameras else []))

        cameras = specs()
        if not cameras:
            raise InputError("no cameras: name SOURCEs or --cameras FILE")
        bind = None if args.http == "off" else parse_bind(args.http, args.token)
        events = args.events
        if events is not None and events != "-" and not events.startswith("jsonl:"):
            raise InputError(f"--events {events}: expected jsonl:FILE or -")
        service = Service(args.out, args.config, config_overrides(args), jsonl=events.removeprefix("jsonl:")
                          if events else None, webhook=args.webhook, mqtt=args.mqtt, with_images=args.event_images)
        web = None
        try:
            for spec in cameras:
                service.add(spec)
            if bind is not None:
                web = WebServer(service, *bind, args.token).start()
                sys.stderr.write(f"cafi-stream: serving {web.url} ({len(cameras)} cameras)\n")
                sys.stderr.flush()
            while not stop.wait(0.2):
                if reload.is_set():
                    reload.clear()
                    try:
                        service.apply(specs())
                    except CafiError as e:   # a bad file on reload keeps the cameras as they are
                        log.error("reload: %s", e)
        finally:
            service.stop()
            if web is not None:
                web.stop()
        return {"out_dir": str(service.root), "cameras": {c["name"]: {k: c[k] for k in ("state", "tracks_written")}
                                                           for c in service.describe()},
                "engines": service.engine_counts()}

    def on_signal(signum, _frame):
        if stop.is_set() and signum == signal.SIGINT:
            os._exit(130)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    result, code = _guarded(work, args.verbose)
    if result is not None:
        print(json.dumps(result))
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["engines"]:
        return engines_main(argv[1:])
    if argv[:1] == ["batch"]:
        return batch_main(argv[1:])
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
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
