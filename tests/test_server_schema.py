"""Schemathesis over the live server's own OpenAPI schema: no 5xx, every error is JSON.

Valid and invalid requests are generated for every operation from /openapi.json and sent
to a real uvicorn server. A modest number per operation: the long fuzzing and load runs
belong to the reliability suite. (Driven through Hypothesis directly: schemathesis's
pytest plugin does not run under this pytest.)
"""

from __future__ import annotations

import pytest

from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library
from tests.live_server import served

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402 - after the importorskip
from hypothesis.errors import Unsatisfiable  # noqa: E402

EXAMPLES = 25


@pytest.fixture
def api_schema(tmp_path, photo_folder, fake_encoder):
    root = tmp_path / "library"
    with Library.open(root, create=True) as lib:
        index_paths(lib, fake_encoder, [photo_folder])
    with served(root, fake_encoder, index_roots=(tmp_path,), max_upload_mb=2) as (server, _):
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json"), server.url


def check(response, case) -> None:
    where = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, (where, response.status_code, response.text[:500])
    if response.status_code >= 400:
        content_type = response.headers.get("content-type", [""])
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        assert content_type.startswith("application/json"), (where, response.text[:200])
        error = response.json()["error"]
        assert error["code"] and error["message"], where


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_errors_and_errors_are_json(api_schema, mode):
    schema, url = api_schema
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    generation_mode = schemathesis.GenerationMode(mode)
    tried = 0
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=generation_mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def run(case):
            check(case.call(base_url=url, timeout=30), case)

        try:
            run()
            tried += 1
        except Unsatisfiable:  # nothing invalid to send (an operation without parameters)
            assert mode == "negative", operation.label
    assert tried >= 10
