"""Schemathesis over the live server's own OpenAPI schema: no 5xx, every error is JSON.

Valid and invalid requests are generated for every operation from /openapi.json and sent
to a real uvicorn server. A modest number per operation: the long fuzzing and load runs
belong to the reliability suite. (Driven through Hypothesis directly: schemathesis's
pytest plugin does not run under this pytest.)
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library
from tests.live_server import served

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402 - after the importorskip
from hypothesis import strategies as st  # noqa: E402
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


# -- hostile values for every field -----------------------------------------------------------
# Schemathesis draws values that fit (or break) the declared types; these are the inputs an
# attacker or a careless client sends that no type rules out: lone surrogates (JSON escapes
# in a body, invalid UTF-8 bytes in a query string or a form), NUL and control characters,
# U+FFFD, undecodable file-name bytes, NaN / Infinity / 1e999 and huge integers as raw JSON,
# very long strings, and any byte a header may carry. Each is sent, field by field (headers
# included), to every operation of /openapi.json.
HOSTILE_TEXT = st.one_of(
    st.sampled_from(
        [
            "\ud800",
            "\udfff",
            "a\udbff\udfffb",
            "caf\udce9",
            "\x00",
            "a\x00b",
            "\x1b[2J",
            "\x85",
            "\ufffd",
            "\ufeff\uffff",
            "..",
            "../../etc/passwd",
            "{}",
            "%00",
            "1e39:dog",
            "100000000000000000000:dog + cat",
            "-",
            '"',
            "x" * 5000,
            "é" * 3000,
        ]
    ),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),  # surrogates too
)
HOSTILE_NUMBER = st.sampled_from(
    [
        "NaN",
        "Infinity",
        "-Infinity",
        "1e999",
        "-1e999",
        "1e308",
        "4e-400",
        "-0",
        "99999999999999999999999999",
        str(2**63),
        str(-(2**63) - 1),
        "0",
        "-1",
        "0.5",
        "1",
    ]
)
FIELDS_PER_REQUEST = 3
# Headers every route may read (the token, the page's cookie, caching and ranges).
HOSTILE_HEADERS = ("Authorization", "Cookie", "If-None-Match", "If-Range", "Range")


def _kind(schema: dict, components: dict) -> str:
    """text, number, array (of text), file or object: what a field takes."""
    for option in schema.get("anyOf", [schema]):
        if "$ref" in option:
            option = components[option["$ref"].rsplit("/", 1)[1]]
        kind = option.get("type")
        if option.get("contentMediaType") or option.get("format") == "binary":
            return "file"
        if kind in ("integer", "number"):
            return "number"
        if kind in ("string", "array"):
            return "text" if kind == "string" else "array"
    return "text"


def _fields(spec: dict) -> list[tuple[str, str, str, dict[str, str]]]:
    """(method, path, body content type or "", {field: kind}) for every operation."""
    components = spec["components"]["schemas"]
    out = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            fields = {
                f"{p['in']}:{p['name']}": _kind(p["schema"], components)
                for p in operation.get("parameters", [])
            }
            content = operation.get("requestBody", {}).get("content", {})
            body_type = next(iter(content), "")
            if body_type:
                ref = content[body_type]["schema"]["$ref"].rsplit("/", 1)[1]
                for name, schema in components[ref]["properties"].items():
                    fields[f"body:{name}"] = _kind(schema, components)
            fields.update({f"header:{name}": "header" for name in HOSTILE_HEADERS})
            out.append((method.upper(), path, body_type, fields))
    return out


def _raw_text(value: str) -> bytes:
    """A str as bytes on the wire: a lone surrogate becomes bytes that are not UTF-8."""
    return value.encode("utf-8", "surrogatepass")


def _json_token(kind: str, value: str) -> str:
    """Raw JSON: strings with \\uXXXX escapes (lone surrogates kept), numbers verbatim."""
    if kind == "number":
        return value
    text = json.dumps(value)  # ensure_ascii: a lone surrogate is written \\udXXX
    return f"[{text}]" if kind == "array" else text


def _request(url, method, path, body_type, values: dict[str, tuple[str, str]], photo: bytes):
    """Build the httpx request for ``values`` ({field: (kind, value)})."""
    from urllib.parse import quote_from_bytes

    target = path
    query = []
    json_fields, form, files, headers = {}, [], {}, {}
    for field, (kind, value) in values.items():
        where, name = field.split(":", 1)
        if where == "header":  # any byte a header may carry (no CR, LF or NUL): Latin-1
            raw = _raw_text(value)
            headers[name] = bytes(b for b in raw if b == 9 or 32 <= b != 127).strip(b" \t")
        elif where == "path":
            target = target.replace("{" + name + "}", quote_from_bytes(_raw_text(value), ""))
        elif where == "query":
            query.append(f"{name}={quote_from_bytes(_raw_text(value), '')}")
        elif body_type == "application/json":
            json_fields[name] = _json_token(kind, value)
        elif kind == "file":
            files[name] = (_raw_text(value).decode("latin-1"), photo, "image/jpeg")
        else:
            form.append((name, _raw_text(value)))
    for name in re.findall(r"{(\w+)}", target):
        target = target.replace("{" + name + "}", "1")
    full = f"{url}{target}" + (f"?{'&'.join(query)}" if query else "")
    if body_type == "application/json":
        body = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in json_fields.items()) + "}"
        headers["Content-Type"] = body_type
        return httpx.Request(method, full, content=body.encode(), headers=headers)
    if body_type:
        return _multipart(method, full, form, files, headers)
    return httpx.Request(method, full, headers=headers)


def _multipart(method, url, form, files, headers) -> httpx.Request:
    """multipart/form-data written by hand, so text fields carry their raw bytes."""
    boundary = b"hostile-boundary-7f3a"
    parts = []
    for name, raw in form:
        parts.append(b'Content-Disposition: form-data; name="%s"\r\n\r\n%s' % (name.encode(), raw))
    for name, (filename, data, content_type) in files.items():
        header = b'Content-Disposition: form-data; name="%s"; filename="%s"\r\n' % (
            name.encode(),
            filename.encode("latin-1").replace(b'"', b"").replace(b"\r", b"").replace(b"\n", b""),
        )
        parts.append(header + b"Content-Type: %s\r\n\r\n%s" % (content_type.encode(), data))
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    body += b"--" + boundary + b"--\r\n"
    headers["Content-Type"] = "multipart/form-data; boundary=" + boundary.decode()
    return httpx.Request(method, url, content=body, headers=headers)


@pytest.fixture
def hostile_target(tmp_path, photo_folder, fake_encoder):
    root = tmp_path / "library"
    with Library.open(root, create=True) as lib:
        index_paths(lib, fake_encoder, [photo_folder])
    with served(root, fake_encoder, index_roots=(tmp_path,), max_upload_mb=2) as (server, client):
        photo = (photo_folder / "photo_0.jpg").read_bytes()
        yield server.url, client, _fields(client.get("/openapi.json").json()), photo


def test_hostile_values_in_every_field_are_4xx_never_5xx(hostile_target):
    """Up to FIELDS_PER_REQUEST hostile fields per request, the rest left out; every answer
    is below 500, and every 4xx is the JSON error shape. /readyz and a normal search
    still answer afterwards."""
    url, client, operations, photo = hostile_target

    @given(data=st.data())
    @settings(
        max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def run(data):
        method, path, body_type, fields = data.draw(st.sampled_from(operations))
        chosen = data.draw(
            st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=FIELDS_PER_REQUEST)
            if fields
            else st.just([])
        )
        values = {}
        for field in chosen:
            kind = fields[field]
            value = data.draw(HOSTILE_NUMBER if kind == "number" else HOSTILE_TEXT)
            if kind == "header" and data.draw(st.booleans()):
                value = data.draw(HOSTILE_NUMBER)  # Range: bytes=0-NaN and the like
                value = f"bytes={value}-" if field == "header:Range" else value
            values[field] = (kind, value)
        response = client.send(_request(url, method, path, body_type, values, photo))
        where = f"{method} {path} {values!r}"[:400]
        assert response.status_code < 500, (where, response.status_code, response.text[:300])
        if response.status_code >= 400:
            assert response.headers["content-type"].startswith("application/json"), where
            error = response.json()["error"]
            assert error["code"] and error["message"], where

    run()
    assert client.get("/readyz").status_code == 200
    found = client.get("/api/search", params={"q": "a red ball", "k": 2})
    assert found.status_code == 200 and len(found.json()["results"]) == 2
