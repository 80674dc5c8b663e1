"""`clipdex serve` itself, as a subprocess, with the real MobileCLIP-S2 architecture.

Random weights loaded through the real ``--weights`` path (shared/DESIGN.md): the server
indexes a folder through ``POST /api/index``, then answers a text query, an image upload
and the OpenAI endpoint with the model it keeps warm.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.live_server import wait_ready


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def serve_process(tmp_path, photo_folder, spread_checkpoint):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+b")  # noqa: SIM115 - closed below
    command = [
        sys.executable, "-m", "retrieval.cli", "serve",
        "--port", str(port),
        "--library", str(tmp_path / "library"),
        "--weights", str(spread_checkpoint),
        "--index-root", str(photo_folder),
        "--log-level", "warning",
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=600)
        yield url
    except TimeoutError:
        log.seek(0)
        pytest.fail(f"clipdex serve did not become ready:\n{log.read().decode()[-4000:]}")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_serve_indexes_and_searches_with_the_real_architecture(serve_process, photo_folder):
    client = httpx.Client(base_url=serve_process, timeout=120)
    job = client.post("/api/index", json={"paths": [str(photo_folder)]}).json()
    deadline = time.monotonic() + 300
    while job["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = client.get(job["status_url"]).json()
    assert job["state"] == "done" and job["report"]["indexed"] == 6, job

    text = client.get("/api/search", params={"q": "a photo of a dog", "k": 3}).json()
    assert len(text["results"]) == 3
    assert all(-1.0 <= hit["score"] <= 1.0 for hit in text["results"])

    data = (photo_folder / "photo_2.jpg").read_bytes()
    upload = client.post("/api/search/image", files={"file": ("q.jpg", data, "image/jpeg")})
    best, runner_up = upload.json()["results"][:2]
    assert best["path"].endswith("photo_2.jpg") and best["score"] > 0.999
    assert runner_up["score"] < 0.95  # decided by the photos (spread weights), not by noise

    embedded = client.post(
        "/v1/embeddings",
        json={"model": "mobileclip-s2", "input": ["a dog", "a cat"]},
    ).json()
    vectors = np.asarray([item["embedding"] for item in embedded["data"]])
    assert vectors.shape == (2, 512)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert client.get("/api/info").json()["model"].startswith("MobileCLIP-S2/sha256:")


def test_serve_help_names_its_flags():
    out = subprocess.run(
        [sys.executable, "-m", "retrieval.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    for flag in ("--host", "--port", "--library", "--weights", "--token", "--max-upload-mb",
                 "--index-root", "--request-timeout", "--max-connections"):
        assert flag in out


def test_serve_warns_when_exposed_without_a_token(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from retrieval.cli import app
    from retrieval.server import serving

    started = {}

    def run_server(app, settings, host, port, **kw) -> None:
        started.update(kw, app=app, host=host, port=port, config=serving.uvicorn_config(
            app, settings, host, port, **kw))

    monkeypatch.setattr(serving, "run_server", run_server)
    monkeypatch.setenv("CLIPDEX_INDEX_ROOTS", f"{tmp_path}/a{os.pathsep}{tmp_path}/b")
    args = ["serve", "--host", "0.0.0.0", "--port", "8123", "--library", str(tmp_path / "lib")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "without a token" in result.output and started["port"] == 8123
    settings = started["app"].state.clipdex.settings
    assert [p.name for p in settings.index_roots] == ["a", "b"]
    config = started["config"]  # the limits against slow clients (see test_server_limits)
    assert config.limit_concurrency == settings.max_connections == 256
    assert config.http.header_timeout == settings.header_timeout == 10.0
    assert settings.request_timeout == 60.0 and not config.server_header
    quiet = CliRunner().invoke(app, [*args, "--token", "t"])
    assert "without a token" not in quiet.output
