"""The Docker deployment, checked without a Docker engine.

The compose file parses and runs a command the image really has (the ``clipdex`` console
script's ``serve`` with flags and environment variables it accepts); the Dockerfile copies
what exists and installs the project the way a wheel does, and that wheel carries the
server package and the web page.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import typer.main

from retrieval.cli import app

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
SETUPTOOLS_WARNING = re.compile(
    r".*(?:Warning:|absent from the `packages` configuration|package data).*"
)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def serve_command():
    return typer.main.get_command(app).commands["serve"]


def test_compose_runs_clipdex_serve_with_real_flags(compose):
    service = compose["services"]["clipdex"]
    command = service["command"]
    assert command[:2] == ["clipdex", "serve"]
    (script,) = metadata.entry_points(group="console_scripts", name="clipdex")
    assert script.value == "retrieval.cli:main"
    known = {opt for param in serve_command().params for opt in param.opts}
    flags = [part for part in command[2:] if part.startswith("--")]
    assert flags and set(flags) <= known
    assert command[command.index("--port") + 1] == "8000"


def test_compose_environment_is_read_by_serve(compose):
    envvars = {param.envvar for param in serve_command().params if param.envvar}
    for name in compose["services"]["clipdex"]["environment"]:
        if name.startswith("CLIPDEX_"):
            assert name in envvars, name


def test_compose_volumes_healthcheck_and_port(compose):
    service = compose["services"]["clipdex"]
    assert {"library", "model-cache"} <= set(compose["volumes"])
    mounts = service["volumes"]
    assert "library:/data/library" in mounts and "model-cache:/cache" in mounts
    photos = next(m for m in mounts if ":/photos" in m)
    assert photos.endswith(":ro")
    health = " ".join(service["healthcheck"]["test"])
    assert "/healthz" in health and ":8000" in health
    assert service["ports"] == ["127.0.0.1:8000:8000"]


def test_dockerfile_installs_the_project_and_runs_the_same_command(dockerfile, compose):
    assert re.search(r'pip install "\.\[torch,s3\]"', dockerfile)  # s3: bucket URIs
    assert "torch" in metadata.metadata("clipdex").get_all("Provides-Extra")
    pyproject = (REPO / "pyproject.toml").read_text()  # (tomllib: Python 3.11+)
    assert re.search(r"^s3 = \[", pyproject, re.MULTILINE)  # the extra the image installs
    for source in re.findall(r"^COPY (\S+)", dockerfile, re.MULTILINE):
        assert (REPO / source).exists(), source
    ignored = (REPO / ".dockerignore").read_text().split()
    assert not {"indexer", "retrieval", "pyproject.toml", "README.md"} & set(ignored)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE).group(1))
    assert cmd == compose["services"]["clipdex"]["command"]
    assert "/healthz" in dockerfile and "HEALTHCHECK" in dockerfile


def test_a_built_wheel_carries_the_server_and_the_page(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("indexer", "retrieval"):
        shutil.copytree(REPO / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
         "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    # setuptools warns (pages of it) when data lies in folders the packages do not declare.
    noise = SETUPTOOLS_WARNING.findall(build.stdout + build.stderr)
    assert not noise, noise
    wheel = next((tmp_path / "dist").glob("clipdex-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("retrieval/server/app.py", "retrieval/server/api.py",
                   "retrieval/server/web/index.html", "retrieval/server/web/app.js",
                   "retrieval/server/web/app.css", "retrieval/cli/app.py",
                   "retrieval/search/labels.txt",
                   "indexer/model/assets/bpe_simple_vocab_16e6.txt.gz"):
        assert needed in names, needed
