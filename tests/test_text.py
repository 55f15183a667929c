"""text: names from disk printed and written as text that cannot drive a terminal or a spreadsheet."""

from __future__ import annotations

import logging

import pytest

from caltech_cli.text import EscapeArguments, shown, text_cell


@pytest.mark.hostile
@pytest.mark.parametrize(
    "cell",
    ["=SUM(1+1)", "+1", "-1+2", "@cmd", "|calc", "\tTAB", "\rCR", "\n=1+1", " =1+1", "  @cmd", "＝SUM(1)", "＋1"],
)
def test_every_cell_a_spreadsheet_would_run_is_text(cell):
    assert text_cell(cell) == "'" + cell


def test_plain_names_stay_as_they_are():
    assert [text_cell(name) for name in ("cats", "Leopards", "dog 2", "", "a=b")] == [
        "cats",
        "Leopards",
        "dog 2",
        "",
        "a=b",
    ]


@pytest.mark.hostile
def test_names_cannot_forge_lines_or_move_the_terminal(capsys):
    """A file or class name with a newline and a fake error, or an escape sequence, is printed escaped."""
    forged = "photo.jpg\ncaltech: error: forged\x1b[2J"
    assert shown(forged) == "photo.jpg\\ncaltech: error: forged\\x1b[2J"
    assert shown("caf\udce9.jpg") == "caf\\xe9.jpg", "a name that is not valid UTF-8"
    record = logging.LogRecord("caltech_cli", logging.INFO, __file__, 1, "Ignoring %s", (forged,), None)
    assert EscapeArguments().filter(record) and record.getMessage() == "Ignoring " + shown(forged)
