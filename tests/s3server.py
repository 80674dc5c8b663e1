"""A real S3-compatible server for tests: moto's, on 127.0.0.1, started by the test itself.

``pip install 'moto[server]'`` (in the test extra). :func:`s3_server` yields an
:class:`S3Server`; :meth:`S3Server.environ` is what a clipdex process needs to reach it
(endpoint and test credentials; no instance-metadata probing).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import corpus_dir
from tests.videogen import write_video

PHOTOS, BROKEN = 6, 1  # corpus photos that index, and a file the MANIFEST says must fail
GOOD = PHOTOS + 1  # and a short video made of two of them


@dataclass
class S3Server:
    endpoint: str
    client: Any  # a boto3 S3 client

    def environ(self) -> dict[str, str]:
        return {
            "CLIPDEX_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def upload(self, folder: Path, bucket: str, prefix: str) -> None:
        """Every file under ``folder`` as ``prefix/relative/path`` in ``bucket``."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            self.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    moto_server = pytest.importorskip("moto.server", reason="pip install 'moto[server]'")
    boto3 = pytest.importorskip("boto3")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        yield S3Server(endpoint, client)
    finally:
        server.stop()


def sample_folder(target: Path, video: bool = True) -> Path:
    """A few small real corpus photos (some in a sub-folder), a short video, a file that
    must fail, and a hidden file that is skipped: what the tests upload, and index locally
    for comparison. ``video=False``: no video (a local run gives a video its id when it is
    decoded, before the photos of its batch; a cluster run in discovery order)."""
    import csv

    corpus = corpus_dir()
    if corpus is None:
        pytest.skip("image corpus absent: set CLIPDEX_CORPUS to shared/imgcorpus")
    good, broken = [], []
    with open(corpus / "MANIFEST.tsv", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            path = corpus / row["path"]
            if not path.is_file() or path.stat().st_size > 300_000:
                continue
            if row["expected"].startswith("should-index") and path.suffix.lower() == ".jpg":
                good.append(path)
            elif row["expected"].startswith("should-reject") and path.suffix.lower() == ".png":
                broken.append(path)
    picked = sorted(good)[:PHOTOS] + sorted(broken)[:BROKEN]
    for i, path in enumerate(picked):
        folder = target / ("sub" if i % 3 == 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / f"{i:02d}_{path.name}")
    (target / ".hidden.jpg").write_bytes(picked[0].read_bytes())
    if video:
        write_video(target / "sub" / "clip.mp4", picked[:2], 1.0, size=(96, 64))
    return target
