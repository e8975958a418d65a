"""`cafi-stream serve`: many cameras in one process, events to real receivers, /metrics, the camera API, signals."""

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import FR_MODEL, ROOT, VIDEO
from test_batch import CHROMEDRIVER, CHROMIUM
from test_live import free_port, needs_rtsp, rtsp_server, wait_for

TOKEN = "s3cret-token"
FAST = ("--iqa", "none", "--fr-model", FR_MODEL)


def serve(out: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cafi_stream.cli", "serve", "--out", str(out), *FAST,
                             *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def base_url(proc: subprocess.Popen) -> str:
    """The address the service printed once it listens (it binds port 0)."""
    line = proc.stderr.readline()
    while line and "serving http://" not in line:
        line = proc.stderr.readline()
    assert line, "serve exited before it listened"
    return line.split("serving ", 1)[1].split()[0]


def get(url: str, token: str | None = None, method: str = "GET", body: dict | None = None):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), ""


def stop(proc: subprocess.Popen) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return out, err


class Receiver:
    """A real webhook receiver on 127.0.0.1: records every event id it is sent."""

    def __init__(self, port: int):
        self.port, self.ids, self.server = port, [], None

    def start(self) -> "Receiver":
        ids = self.ids

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert body["id"] == self.headers["X-Cafi-Event-Id"]
                ids.append(body["id"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def cameras_file(path: Path) -> Path:
    path.write_text(f'[[camera]]\nname = "door"\nurl = "{VIDEO}"\nloop = true\n\n'
                    f'[[camera]]\nname = "hall"\nurl = "{VIDEO}"\nloop = true\ntopk = 2\n')
    return path


def written(out: Path, camera: str) -> list[dict]:
    return [json.loads(line) for f in sorted((out / camera).glob("*/metadata.jsonl"))
            for line in f.read_text().splitlines()]


def test_two_cameras_one_process_events_metrics_api_and_webhook_across_a_restart(tmp_path):
    """Two looped cameras (one with its own --topk) in one process. The webhook receiver is down for the whole
    first session, 60 s and more (its events wait in the spool), then the service is restarted with the receiver
    up: every event id the service made reaches it. /metrics answers in Prometheus format, the camera API needs
    the token, the latest faces' images load, and SIGINT exits 0 with every open track written."""
    from prometheus_client.parser import text_string_to_metric_families

    out, events, port = tmp_path / "out", tmp_path / "events.jsonl", free_port()
    cams = cameras_file(tmp_path / "cameras.toml")
    common = ("--cameras", cams, "--http", "127.0.0.1:0", "--token", TOKEN, "--events", f"jsonl:{events}",
              "--webhook", f"http://127.0.0.1:{port}/hook")

    proc = serve(out, *common)
    down_since = time.monotonic()
    url = base_url(proc)
    wait_for(lambda: events.exists() and len(events.read_text().splitlines()) >= 4, 120, "events", proc)
    assert get(url + "/healthz")[0] == 200
    assert get(url + "/metrics")[0] == 403 and get(url + "/api/cameras")[0] == 403
    status, body, ctype = get(url + "/metrics", TOKEN)
    assert status == 200 and ctype.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ("cafi_input_fps", "cafi_processed_fps", "cafi_dropped_frames", "cafi_reconnects", "cafi_queue_depth",
                 "cafi_open_tracks", "cafi_events_sent", "cafi_events_failed", "cafi_events_spooled",
                 "cafi_frame_to_event_seconds"):
        assert {s.labels["camera"] for s in families[name].samples} == {"door", "hall"}, name
    engine = {s.labels["engine"]: s.value for s in families["cafi_engine_rows"].samples if s.name.endswith("_total")}
    assert engine["serfiq"] > 0 and engine["detector"] > 0   # both cameras' faces and frames: the shared engines
    spooled = {s.labels["camera"]: s.value for s in families["cafi_events_spooled"].samples}
    assert sum(spooled.values()) > 0   # the receiver is down: events wait
    cameras = json.loads(get(url + "/api/cameras", TOKEN)[1])["cameras"]
    assert {c["name"]: c["topk"] if "topk" in c else None for c in cameras} == {"door": None, "hall": 2}
    assert get(url + "/api/cameras", method="POST", body={"name": "x", "url": str(VIDEO)})[0] == 403
    latest = json.loads(get(url + "/api/latest", TOKEN)[1])["cameras"]
    image = next(f["image"] for c in latest for f in c["faces"])
    status, jpeg, _ = get(f"{url}/files/{image}", TOKEN)
    assert status == 200 and jpeg[:2] == b"\xff\xd8"
    assert get(f"{url}/files/../../etc/passwd", TOKEN)[0] == 404
    wait_for(lambda: time.monotonic() - down_since > 60, 90, "60 s of the receiver down", proc)
    stop(proc)
    first = [json.loads(line)["id"] for line in events.read_text().splitlines()]
    assert list((out / "_events" / "webhook").glob("*.json"))   # kept for the next session

    receiver = Receiver(port).start()
    try:
        proc = serve(out, *common)
        base_url(proc)
        wait_for(lambda: set(first) <= set(receiver.ids), 60, "the spooled events", proc)
        wait_for(lambda: len(events.read_text().splitlines()) > len(first) + 2, 120, "new events", proc)
        stop(proc)
    finally:
        receiver.stop()
    made = [json.loads(line) for line in events.read_text().splitlines()]
    assert len({e["id"] for e in made}) == len(made)
    assert {e["id"] for e in made} <= set(receiver.ids)   # every event, at least once
    for camera in ("door", "hall"):
        rows = written(out, camera)
        assert rows, camera
        assert len(list((out / camera).iterdir())) == 2   # one folder per session, the first left as it was
        finals = {(e["track_id"], r["frame_index"]) for e in made if e["camera"] == camera and e["final"]
                  for r in e["rows"]}
        assert finals == {(r["track_id"], r["frame_index"]) for r in rows}   # every written track has its event
    assert max(r["rank"] for r in written(out, "hall")) <= 2


def test_bad_serve_input_is_one_line(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    (single / "metadata.jsonl").write_text("")
    bad_name = tmp_path / "bad.toml"
    bad_name.write_text('[[camera]]\nname = "../up"\nurl = "rtsp://127.0.0.1:1/x"\n')
    for args, words in (((VIDEO, "--http", "0.0.0.0:0"), "needs --token"),
                        ((), "no cameras"),
                        (("--cameras", bad_name), "camera name"),
                        ((VIDEO, "--http", "127.0.0.1:0", "--webhook", "ftp://x/"), "not an http(s) URL")):
        proc = subprocess.run([sys.executable, "-m", "cafi_stream.cli", "serve", "--out", str(tmp_path / "o"),
                               *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "cafi_stream.cli", "serve", "--out", str(single), str(VIDEO),
                           "--http", "off"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "not a serve folder" in proc.stderr, proc.stderr
    assert (single / "metadata.jsonl").exists()


@needs_rtsp
def test_credentials_of_a_camera_url_never_leave_the_process(tmp_path):
    """A camera URL with user and password: the password is in no file under OUT, no event, no stderr or stdout
    line, and not in /metrics, the camera API or the page."""
    password = "pw-9f3c1e77"
    port = free_port()
    out, events = tmp_path / "out", tmp_path / "events.jsonl"
    with rtsp_server(port, VIDEO):
        proc = serve(out, f"rtsp://viewer:{password}@127.0.0.1:{port}/stream", "--http", "127.0.0.1:0",
                     "--events", f"jsonl:{events}")
        url = base_url(proc)
        wait_for(lambda: events.exists() and events.read_text().strip(), 120, "an event", proc)
        pages = [get(url + p)[1].decode(errors="replace") for p in ("/metrics", "/api/cameras", "/api/latest", "/")]
        stdout, stderr = stop(proc)
    assert any("***" in p for p in pages)   # the camera list shows the URL, redacted
    texts = [stdout, stderr, *pages] + [p.read_bytes().decode(errors="replace") for p in out.rglob("*")
                                        if p.is_file()] + [events.read_text()]
    assert not [t[:200] for t in texts if password in t]


@pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                    reason="Debian's mosquitto broker not installed; .ci/run installs it")
def test_events_reach_an_mqtt_broker(tmp_path):
    import paho.mqtt.client as mqtt

    port = free_port()
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got: list[str] = []
    images: list[bytes] = []

    def on_message(client, userdata, msg):
        event = json.loads(msg.payload)
        got.append(event["id"])
        images.extend(base64.b64decode(b) for b in event["image_bytes"].values())

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    try:
        wait_for(lambda: client.connect("127.0.0.1", port) == 0 if _can_connect(port) else False, 20, "mosquitto")
        client.subscribe("cafi/events", qos=1)
        client.loop_start()
        out, events = tmp_path / "out", tmp_path / "events.jsonl"
        proc = serve(out, VIDEO, "--loop", "--http", "off", "--events", f"jsonl:{events}", "--event-images",
                     "--mqtt", f"mqtt://127.0.0.1:{port}/cafi/events")
        wait_for(lambda: events.exists() and len(events.read_text().splitlines()) >= 2, 120, "events", proc)
        stop(proc)
        made = {json.loads(line)["id"] for line in events.read_text().splitlines()}
        wait_for(lambda: made <= set(got), 20, "the events over MQTT")
        # --event-images: each event carries its crops (context JPEG, aligned and masked PNG)
        assert images and all(b[:2] == b"\xff\xd8" or b[:4] == b"\x89PNG" for b in images)
    finally:
        client.loop_stop()
        broker.kill()
        broker.wait()


def _can_connect(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                    reason=f"headless Chromium not found ({CHROMIUM}, {CHROMEDRIVER}: Debian's chromium and "
                           "chromium-driver; .ci/run installs them)")
def test_page_shows_each_cameras_latest_faces_and_updates(tmp_path):
    """The page in headless Chromium: every camera's latest faces, their images loaded, and a newer event shown
    without reloading the page."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as Driver

    cams = cameras_file(tmp_path / "cameras.toml")
    events = tmp_path / "events.jsonl"
    proc = serve(tmp_path / "out", "--cameras", cams, "--http", "127.0.0.1:0", "--token", TOKEN,
                 "--events", f"jsonl:{events}")
    url = base_url(proc)
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Driver(CHROMEDRIVER), options=opts)
    shown = ("return [...document.querySelectorAll('.cam')].map(c => [c.dataset.camera, c.dataset.event, "
             "[...c.querySelectorAll('img')].map(i => i.complete && i.naturalWidth > 0)])")
    try:
        driver.get(f"{url}/?token={TOKEN}")

        def cameras_with_faces():
            state = driver.execute_script(shown)
            return {name: event for name, event, imgs in state if event and imgs and all(imgs)}

        wait_for(lambda: set(cameras_with_faces()) == {"door", "hall"}, 120, "both cameras' faces on the page", proc)
        first = cameras_with_faces()
        wait_for(lambda: any(cameras_with_faces().get(n) != e for n, e in first.items()), 120,
                 "a newer event on the page", proc)
        # Cameras come and go without a restart: through the API (with the token), and on SIGHUP.
        names = lambda: {c["name"] for c in json.loads(get(url + "/api/cameras", TOKEN)[1])["cameras"]}  # noqa: E731
        lobby = {"name": "lobby", "url": str(VIDEO), "loop": True}
        assert get(url + "/api/cameras", TOKEN, "POST", lobby)[0] == 201 and names() == {"door", "hall", "lobby"}
        assert get(url + "/api/cameras", TOKEN, "POST", {**lobby, "nonsense": 1})[0] == 400
        assert get(url + "/api/cameras/lobby", TOKEN, "DELETE")[0] == 200 and names() == {"door", "hall"}
        cams.write_text(cams.read_text().split("[[camera]]\nname = \"hall\"")[0])
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: names() == {"door"}, 60, "hall gone after SIGHUP", proc)
    finally:
        driver.quit()
        stop(proc)
    made = {json.loads(line)["id"] for line in events.read_text().splitlines()}
    assert set(first.values()) <= made   # the page showed the events the service made
    assert list((tmp_path / "out" / "lobby").glob("*/summary.json"))   # a removed camera finished its files


def test_a_camera_that_never_connects_stalls_neither_the_others_nor_the_shutdown(tmp_path):
    """One camera's URL has nothing listening: it keeps retrying while the other camera writes tracks, /api/cameras
    shows it disconnected, and SIGINT still exits 0 at once."""
    dead = f"rtsp://127.0.0.1:{free_port()}/nothing"
    events = tmp_path / "events.jsonl"
    proc = serve(tmp_path / "out", VIDEO, dead, "--loop", "--http", "127.0.0.1:0", "--events", f"jsonl:{events}")
    url = base_url(proc)
    wait_for(lambda: events.exists() and events.read_text().strip(), 120, "the live camera's events", proc)
    states = {c["name"]: c for c in json.loads(get(url + "/api/cameras")[1])["cameras"]}
    assert states["nothing"]["connected"] is not True and states["short_hamilton_clip"]["connected"]
    t0 = time.monotonic()
    stdout, _ = stop(proc)
    assert time.monotonic() - t0 < 60
    cams = json.loads(stdout.strip().splitlines()[-1])["cameras"]
    assert cams["nothing"]["state"] == "stopped" and cams["short_hamilton_clip"]["state"] == "stopped"
