"""Model downloads against a real HTTP server on 127.0.0.1, and the offline failure message."""

import functools
import http.server
import shutil
import threading

import pytest

from conftest import FR_MODEL, VIDEO, read_rows, run_cli
from cafi_stream.errors import ModelError
from cafi_stream.models import FR_MODELS, resolve, sha256_of


@pytest.fixture
def http_dir(tmp_path):
    """Serve a folder over HTTP on 127.0.0.1; yields (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verifies_the_checksum(http_dir, tmp_path, monkeypatch):
    root, url = http_dir
    shutil.copy(FR_MODEL, root / FR_MODEL.name)
    monkeypatch.setenv("CAFI_MODEL_MIRROR", url)
    models = tmp_path / "models"
    path = resolve(FR_MODELS["mobilefacenet_paddlex_128d"], models)
    assert path == models / FR_MODEL.name
    assert sha256_of(path) == FR_MODELS["mobilefacenet_paddlex_128d"].sha256
    assert [p.name for p in models.iterdir()] == [FR_MODEL.name]   # no temporary file left


def test_corrupt_download_is_refused(http_dir, tmp_path, monkeypatch):
    root, url = http_dir
    data = bytearray(FR_MODEL.read_bytes())
    data[1000] ^= 0xFF
    (root / FR_MODEL.name).write_bytes(bytes(data))
    monkeypatch.setenv("CAFI_MODEL_MIRROR", url)
    models = tmp_path / "models"
    with pytest.raises(ModelError, match="checksum"):
        resolve(FR_MODELS["mobilefacenet_paddlex_128d"], models)
    assert not any(models.iterdir())


def test_cli_downloads_a_registry_model_by_name(http_dir, tmp_path):
    root, url = http_dir
    shutil.copy(FR_MODEL, root / FR_MODEL.name)
    models = tmp_path / "models"
    proc = run_cli(VIDEO, "--fr-model", "mobilefacenet_paddlex_128d", "--models-dir", models, "--iqa", "none",
                   "--max-frames", 100, "--out", tmp_path / "out", "--quiet", env={"CAFI_MODEL_MIRROR": url})
    assert proc.returncode == 0, proc.stderr
    assert "downloading mobilefacenet_paddlex_128d.onnx" in proc.stderr
    assert (models / FR_MODEL.name).is_file()
    assert read_rows(tmp_path / "out")


def test_offline_without_dbcnn_weights_stops_with_one_line(tmp_path):
    # Nothing listens on the mirror port, and the public hosts are unreachable here.
    proc = run_cli(VIDEO, "--fr-model", FR_MODEL, "--models-dir", tmp_path / "models", "--out", tmp_path / "out",
                   "--quiet", env={"CAFI_MODEL_MIRROR": "http://127.0.0.1:9", "TORCH_HOME": str(tmp_path / "th")})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert "DBCNN_KonIQ10k-2de81c0a.pth" in lines[-1] and str(tmp_path / "models") in lines[-1]
    assert len([line for line in lines if "error" in line]) == 1


def test_cli_downloads_the_default_detector(http_dir, tmp_path):
    """The default face detector is a registry model: fetched from the mirror once, checksum verified."""
    from cafi_stream.detect import DETECTORS
    from conftest import OPTIONAL_MODELS

    spec = DETECTORS["scrfd_2.5g"].model
    root, url = http_dir
    shutil.copy(OPTIONAL_MODELS / spec.file_name, root / spec.file_name)
    models = tmp_path / "models"
    proc = run_cli(VIDEO, "--fr-model", FR_MODEL, "--detector", "scrfd_2.5g", "--models-dir", models, "--iqa", "none",
                   "--max-frames", 60, "--out", tmp_path / "out", "--quiet",
                   env={"CAFI_MODEL_MIRROR": url, "CAFI_MODEL_PATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert f"downloading {spec.file_name}" in proc.stderr
    assert sha256_of(models / spec.file_name) == spec.sha256
