"""The HTTP side of `serve` (aiohttp, in a thread of its own): /metrics for Prometheus, /healthz, a JSON API for
the cameras, the latest best shots, and `/`, a page that shows them updating live.

It binds 127.0.0.1 unless told otherwise; any other address needs a token. With a token, every endpoint except
/healthz wants it (`Authorization: Bearer T`, or `?token=T` for the page and its images), and adding or removing
cameras always does: without one configured, the camera API only reads.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import threading

from .errors import CafiError, InputError
from .serve import CameraSpec, Service

log = logging.getLogger(__name__)

_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*/[0-9TZ-]+/[a-z_]+/[A-Za-z0-9_.-]+\.(?:jpg|png)$")


def parse_bind(text: str, token: str | None) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InputError(f"--http {text}: expected HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not token:
        raise InputError(f"--http {text}: binding an address other than 127.0.0.1 needs --token")
    return host, int(port)


class Metrics:
    """A Prometheus collector that reads every camera's figures at scrape time."""

    def __init__(self, service: Service):
        from prometheus_client import CollectorRegistry

        self.service = service
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        cams = list(self.service.cameras.values())
        pub = self.service.publisher
        spooled = pub.spooled()

        def family(kind, name, doc, value):
            f = kind(name, doc, labels=["camera"])
            for cam in cams:
                f.add_metric([cam.spec.name], float(value(cam) or 0))
            return f

        yield family(GaugeMetricFamily, "cafi_input_fps", "frames a second arriving from the camera",
                     lambda c: c.health.get("input_fps"))
        yield family(GaugeMetricFamily, "cafi_processed_fps", "frames a second the pipeline handled",
                     lambda c: c.health.get("processed_fps"))
        yield family(CounterMetricFamily, "cafi_dropped_frames", "frames dropped because scoring fell behind",
                     lambda c: c.health.get("dropped"))
        yield family(CounterMetricFamily, "cafi_reconnects", "connections remade", lambda c: c.health.get("reconnects"))
        yield family(GaugeMetricFamily, "cafi_queue_depth", "decoded frames waiting", lambda c: c.health.get("queue"))
        yield family(GaugeMetricFamily, "cafi_open_tracks", "tracks open now", lambda c: c.health.get("open_tracks"))
        yield family(GaugeMetricFamily, "cafi_connected", "1 while the camera is connected",
                     lambda c: c.health.get("connected", False) and c.state == "running")
        yield family(CounterMetricFamily, "cafi_events_sent", "events delivered", lambda c: pub.sent.get(c.spec.name))
        yield family(CounterMetricFamily, "cafi_events_failed", "failed delivery attempts",
                     lambda c: pub.failed.get(c.spec.name))
        yield family(GaugeMetricFamily, "cafi_events_spooled", "events waiting in the spool",
                     lambda c: spooled.get(c.spec.name))
        engines = self.service.engine_counts()
        for kind, doc in (("calls", "engine calls"),
                          ("rows", "faces (detector: frames and crops) those calls held, from every camera")):
            f = CounterMetricFamily(f"cafi_engine_{kind}", doc, labels=["engine"])
            for name, counts in engines.items():
                f.add_metric([name], float(counts[kind]))
            yield f
        hist = HistogramMetricFamily("cafi_frame_to_event_seconds",
                                     "from the frame a track was last seen in to its event", labels=["camera"])
        for cam in cams:
            h = cam.latency
            buckets = [(str(b), float(c)) for b, c in zip(h.BOUNDS, h.counts)] + [("+Inf", float(h.n))]
            hist.add_metric([cam.spec.name], buckets, sum_value=h.sum)
        yield hist


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>cafi-stream</title>
<style>body{font-family:sans-serif;margin:1em;background:#111;color:#eee}
.cam{margin-bottom:1.5em}.faces{display:flex;gap:.5em;flex-wrap:wrap}
figure{margin:0;background:#222;padding:.3em}img{height:112px;display:block}figcaption{font-size:12px}</style>
</head><body><h1>cafi-stream</h1><div id="cams"></div>
<script>
const q = new URLSearchParams(location.search).get("token");
const auth = q ? "?token=" + encodeURIComponent(q) : "";
function el(tag, attrs, text) { const e = document.createElement(tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]); if (text !== undefined) e.textContent = text; return e; }
let shown = "";
async function refresh() {
  const r = await fetch("/api/latest" + auth); if (!r.ok) return;
  const data = await r.json();
  const now = JSON.stringify(data.cameras.map(c => [c.name, c.state, c.event]));
  if (now === shown) return;   // redraw (and reload images) only when something changed
  shown = now;
  const root = document.getElementById("cams"); root.replaceChildren();
  for (const cam of data.cameras) {
    const div = el("div", {class: "cam", "data-camera": cam.name, "data-event": cam.event || ""});
    div.appendChild(el("h2", {}, cam.name + " (" + cam.state + ")"));
    const faces = el("div", {class: "faces"});
    for (const f of cam.faces) {
      const fig = el("figure");
      fig.appendChild(el("img", {src: "/files/" + f.image + auth, alt: "track " + f.track_id}));
      fig.appendChild(el("figcaption", {}, "track " + f.track_id + " #" + f.rank + " score " + f.score.toFixed(3)));
      faces.appendChild(fig);
    }
    div.appendChild(faces); root.appendChild(div);
  }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""


class WebServer:
    def __init__(self, service: Service, host: str, port: int, token: str | None):
        self.service, self.host, self.port, self.token = service, host, port, token
        self.metrics = Metrics(service)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="cafi-http", daemon=True)

    # -- requests
    def _allowed(self, request, write: bool = False) -> bool:
        if self.token is None:
            return not write
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip() or \
            request.query.get("token", "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _app(self):
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        def guarded(write=False):
            def wrap(handler):
                async def inner(request):
                    if not self._allowed(request, write):
                        why = "a token is needed" if self.token else "the service was started without --token"
                        return web.json_response({"error": f"forbidden: {why}"}, status=403)
                    return await handler(request)
                return inner
            return wrap

        async def healthz(request):
            return web.json_response({"ok": True, "cameras": len(self.service.cameras)})

        @guarded()
        async def metrics(request):
            body = await asyncio.to_thread(generate_latest, self.metrics.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        @guarded()
        async def cameras(request):
            return web.json_response({"cameras": self.service.describe()})

        @guarded(write=True)
        async def add(request):
            try:
                body = await request.json()
                spec = CameraSpec.parse(body if isinstance(body, dict) else {}, "POST /api/cameras")
                await asyncio.to_thread(self.service.add, spec)
            except (ValueError, CafiError) as e:
                return web.json_response({"error": str(e)}, status=400)
            return web.json_response({"added": spec.shown}, status=201)

        @guarded(write=True)
        async def remove(request):
            name = request.match_info["name"]
            if name not in self.service.cameras:
                return web.json_response({"error": f"no camera {name}"}, status=404)
            await asyncio.to_thread(self.service.remove, name)
            return web.json_response({"removed": name})

        @guarded()
        async def latest(request):
            out = []
            for cam in list(self.service.cameras.values()):
                ev = cam.latest
                faces = [] if ev is None else [
                    {"track_id": ev.track_id, "rank": row["rank"], "score": row["score"], "serfiq": row["serfiq"],
                     "iqa": row["iqa"], "image": f"{cam.session}/{row['file_name']}"} for row in ev.rows]
                out.append({"name": cam.spec.name, "state": cam.state, "event": ev.id if ev else None,
                            "faces": faces})
            return web.json_response({"cameras": out})

        @guarded()
        async def files(request):
            rel = request.match_info["path"]
            path = self.service.root / rel
            if not _IMAGE.match(rel) or path.is_symlink() or not path.is_file() or \
                    path.resolve().parent.parent.parent.parent != self.service.root.resolve():
                return web.json_response({"error": "not found"}, status=404)
            return web.FileResponse(path)

        @guarded()
        async def page(request):
            return web.Response(text=PAGE, content_type="text/html")

        app = web.Application(client_max_size=64 * 1024)
        app.add_routes([web.get("/healthz", healthz), web.get("/metrics", metrics), web.get("/api/cameras", cameras),
                        web.post("/api/cameras", add), web.delete("/api/cameras/{name}", remove),
                        web.get("/api/latest", latest), web.get("/files/{path:.+}", files), web.get("/", page)])
        return app

    # -- the server's thread
    def _serve(self) -> None:
        from aiohttp import web

        async def main():
            runner = web.AppRunner(self._app(), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.port = runner.addresses[0][1]
            self._stopped = asyncio.Event()
            self._ready.set()
            await self._stopped.wait()
            await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(main())
        except BaseException as e:
            self._error = e
            self._ready.set()

    def start(self) -> "WebServer":
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise InputError(f"--http {self.host}:{self.port}: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

