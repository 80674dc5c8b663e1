"""The OpenAI-compatible endpoint driven by the official ``openai`` client, unchanged."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from indexer.ingest.decode import decode_for_model
from indexer.store.library import Library
from tests.live_server import served

openai = pytest.importorskip("openai")

TOKEN = "openai-style-key"


@pytest.fixture
def server(tmp_path, fake_encoder):
    with Library.open(tmp_path / "library", create=True):
        pass
    with served(tmp_path / "library", fake_encoder, token=TOKEN) as (live, _):
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0)


def png_data_url(colour=(200, 40, 90)) -> tuple[str, bytes]:
    out = io.BytesIO()
    Image.new("RGB", (80, 60), colour).save(out, "PNG")
    data = out.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode(), data


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == ["mobileclip-s2"]
    assert client.models.retrieve("mobileclip-s2").owned_by == "clipdex"


def test_text_embeddings_float(client, fake_encoder):
    texts = ["a dog on the beach", "a red car"]
    answer = client.embeddings.create(
        model="mobileclip-s2", input=texts, encoding_format="float"
    )
    assert answer.object == "list" and answer.model == "mobileclip-s2"
    assert [d.index for d in answer.data] == [0, 1]
    got = np.asarray([d.embedding for d in answer.data], dtype=np.float32)
    assert got.shape == (2, 512)
    assert np.allclose(got, fake_encoder.encode_texts(texts), atol=1e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 4


def test_base64_is_the_clients_default_and_decodes_the_same(client, fake_encoder):
    default = client.embeddings.create(model="mobileclip-s2", input="a cat")  # base64 on the wire
    explicit = client.embeddings.create(
        model="mobileclip-s2", input="a cat", encoding_format="base64"
    )
    raw = np.frombuffer(base64.b64decode(explicit.data[0].embedding), dtype="<f4")
    expected = fake_encoder.encode_texts(["a cat"])[0]
    assert np.allclose(default.data[0].embedding, expected, atol=1e-6)
    assert np.allclose(raw, expected, atol=1e-6)


def test_image_data_urls_are_clipdex_extension(client, fake_encoder):
    url, data = png_data_url()
    answer = client.embeddings.create(
        model="mobileclip-s2", input=["a text", url, "another"], encoding_format="float"
    )
    vectors = np.asarray([d.embedding for d in answer.data], dtype=np.float32)
    expected_image = fake_encoder.encode_images(decode_for_model(data)[0][None])[0]
    assert np.allclose(vectors[1], expected_image, atol=1e-5)
    assert np.allclose(vectors[0], fake_encoder.encode_texts(["a text"])[0], atol=1e-6)
    assert np.allclose(vectors[2], fake_encoder.encode_texts(["another"])[0], atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"model": "text-embedding-3-small", "input": "x"}, "NotFoundError"),
        ({"model": "mobileclip-s2", "input": ""}, "BadRequestError"),
        ({"model": "mobileclip-s2", "input": []}, "BadRequestError"),
        ({"model": "mobileclip-s2", "input": [[1, 2, 3]]}, "BadRequestError"),
        ({"model": "mobileclip-s2", "input": [1, 2, 3]}, "BadRequestError"),
        ({"model": "mobileclip-s2", "input": "x", "dimensions": 256}, "BadRequestError"),
        ({"model": "mobileclip-s2", "input": "data:image/png;base64,@@@"}, "BadRequestError"),
    ],
)
def test_client_errors_map_to_openai_exceptions(client, kwargs, error):
    with pytest.raises(getattr(openai, error)) as raised:
        client.embeddings.create(**kwargs)
    body = raised.value.body
    assert body["code"] and body["message"]


def test_an_image_that_is_not_one_is_415(client):
    fake = "data:image/jpeg;base64," + base64.b64encode(b"<svg onload=alert(1)>").decode()
    with pytest.raises(openai.APIStatusError) as raised:
        client.embeddings.create(model="mobileclip-s2", input=[fake])
    assert raised.value.status_code == 415


def test_wrong_key_is_authentication_error(server):
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.embeddings.create(model="mobileclip-s2", input="x")
