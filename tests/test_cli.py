"""The CLI: help for every command, --json documents, exit codes, no tracebacks."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from retrieval.cli import app
from tests.clirun import run

COMMANDS = ["index", "search", "similar", "embed", "info", "failures"]
runner = CliRunner()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "--library" in result.output and "--json" in result.output


def test_top_level_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


def test_index_then_search_json(fake_model, photo_folder):
    result = run("index", str(photo_folder), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["indexed"] == 6 and set(report) == {
        "indexed",
        "unchanged",
        "reused",
        "removed",
        "failed",
        "frames",
        "seconds",
        "index_rebuilt",
        "ocr_read",
        "ocr_with_text",
        "ocr_seconds",
    }
    found = json.loads(run("search", "a red ball", "-k", "3", "--json").stdout)
    assert found["query"] == "a red ball" and len(found["results"]) == 3
    first = found["results"][0]
    # The library stores words (file and folder names), so the search read them too.
    assert set(first) == {"id", "path", "score", "width", "height", "taken_at", "matched"}
    assert found["fusion"] == "calibrated" and set(first["matched"]) >= {"semantic", "text"}
    scores = [r["score"] for r in found["results"]]
    assert scores == sorted(scores, reverse=True)


def test_similar_by_id_returns_itself_first(fake_model, photo_folder):
    run("index", str(photo_folder), "--json")
    found = json.loads(run("search", "x", "-k", "1", "--json").stdout)["results"][0]
    similar = json.loads(run("similar", str(found["id"]), "-k", "2", "--json").stdout)
    assert similar["results"][0]["id"] == found["id"]
    assert similar["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_embed_json_is_unit_vector(fake_model, photo_folder):
    document = json.loads(run("embed", "--text", "hello", "--json").stdout)
    assert document["dim"] == 512 and len(document["vector"]) == 512
    assert sum(x * x for x in document["vector"]) == pytest.approx(1.0, abs=1e-4)
    image = json.loads(run("embed", "--image", str(photo_folder / "photo_0.jpg"), "--json").stdout)
    assert len(image["vector"]) == 512


def test_info_and_failures_json(fake_model, photo_folder):
    (photo_folder / "bad.png").write_bytes(b"garbage")
    run("index", str(photo_folder), "--json")
    info = json.loads(run("info", "--json").stdout)
    assert info["images"] == 6 and info["failed"] == 1 and info["bytes_on_disk"] > 0
    assert info["model"]["architecture"] == "MobileCLIP-S2"
    rows = json.loads(run("failures", "--json").stdout)
    assert rows[0]["path"].endswith("bad.png") and rows[0]["error"]


def test_user_error_exits_1_with_one_line_and_no_traceback(fake_model, tmp_path):
    result = run("search", "dogs", "--library", str(tmp_path / "none"))
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "index some photos" in result.output
    assert "(--library)" in result.output  # the CLI spells the setting's flag


def test_missing_path_to_index_is_exit_1(fake_model, tmp_path):
    result = run("index", str(tmp_path / "missing"))
    assert result.exit_code == 1 and "does not exist" in result.output


def test_usage_errors_exit_2():
    assert run("search").exit_code == 2
    assert run("search", "x", "-k", "0").exit_code == 2
    assert run("embed").exit_code == 2
    assert run("index", "--batch-size", "many", ".").exit_code == 2


def test_unknown_photo_id_is_exit_1(fake_model, photo_folder):
    run("index", str(photo_folder), "--json")
    result = run("similar", "999999")
    assert result.exit_code == 1 and "no photo with id 999999" in result.output


def test_emoji_codes_in_file_names_print_as_written(fake_model, photo_folder):
    (photo_folder / "party:smile:.jpg").write_bytes(b"not a jpeg at all")
    result = runner.invoke(app, ["index", str(photo_folder)])
    assert result.exit_code == 0
    assert "party:smile:.jpg" in result.output  # the failure line names the very file
    assert "\N{SMILING FACE WITH OPEN MOUTH AND SMILING EYES}" not in result.output
