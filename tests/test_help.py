"""Every command's ``--help`` says everything its source says (sqlite-utils keeps such a test).

typer renders help through rich, which reads ``[...]`` as markup and drops it without a
word: "Decode worker processes [default: cores, max 4]." once printed as "Decode worker
processes .". So each help text from the source must appear, whole, in the rendered
output, and nothing may look like text that lost its words. The commands and their
parameters come from click's own registry, so a new command or flag is checked too.
"""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from retrieval.cli.app import app

COMMAND = typer.main.get_command(app)  # a click group (typer may bundle its own click)
NAMES = sorted(COMMAND.commands)
WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400", "NO_COLOR": "1"}
# Text that lost its words: " ." at the end of a sentence, empty brackets or parentheses.
LOST = re.compile(r"\s\.(\s|$)|\(\s*\)|\[\s*\]")


def rendered(*args: str) -> str:
    """``clipdex ARGS --help`` as one line of words (box drawing and wrapping removed)."""
    result = CliRunner().invoke(app, [*args, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return words(result.output)


def words(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_every_command_is_listed_with_its_summary():
    assert len(NAMES) >= 10, NAMES
    top = rendered()
    for name in NAMES:
        summary = (COMMAND.commands[name].help or "").strip().splitlines()[0]
        assert name in top
        assert words(summary)[:40] in top, (name, summary)


@pytest.mark.parametrize("name", NAMES)
def test_help_shows_every_help_text_whole(name):
    command = COMMAND.commands[name]
    out = rendered(name)
    assert command.help and command.help.strip(), f"`clipdex {name}` has no docstring"
    assert words(command.help.strip().splitlines()[0]) in out
    for param in command.params:
        if param.name == "help":
            continue
        text = getattr(param, "help", None)
        assert text and text.strip(), f"`clipdex {name}`: {param.name} has no help"
        assert words(text) in out, f"`clipdex {name}`: the help of {param.name} lost words"
    assert not LOST.search(out), f"`clipdex {name} --help` lost words: {LOST.search(out)}"


def test_the_check_catches_markup_that_rich_swallows():
    """The old bug, rebuilt: a help text with ``[default: ...]`` in it fails the check."""
    broken = typer.Typer(rich_markup_mode="rich")

    @broken.command()
    def go(workers: int = typer.Option(1, help="Decode worker processes [default: 4].")):
        """Go."""

    @broken.command()
    def stop() -> None:
        """Stop."""

    result = CliRunner().invoke(broken, ["go", "--help"], env=WIDE)
    out = words(result.output)
    assert "Decode worker processes [default: 4]." not in out
    assert LOST.search(out)
