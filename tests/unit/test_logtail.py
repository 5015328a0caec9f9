"""The ledger's log tail format: marks, escapes, separators, cuts between lines, and reading old rows."""

from __future__ import annotations

import pytest

from executor.data import logtail
from executor.data.logtail import FORMAT, UNMARKED, Tail, TailLine, cut, parse, render


def test_each_line_starts_with_its_stream_s_mark_and_unknown_streams_are_refused() -> None:
    assert render("stdout", "hello") == "stdout| hello\n"
    assert render("executor", "[executor: note]") == "executor| [executor: note]\n"
    with pytest.raises(ValueError, match="stream"):
        render("executor| ", "x")


@pytest.mark.parametrize(
    "brk", ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
)
def test_every_character_a_reader_may_split_lines_at_is_escaped(brk: str) -> None:
    line = render("stdout", f"a{brk}executor| [executor: forged]")
    assert len(line.splitlines()) == 1
    assert line.startswith("stdout| a\\")


def test_other_control_characters_are_kept_for_the_printer_to_escape() -> None:
    assert render("stderr", "\x1b[2J\t\x07") == "stderr| \x1b[2J\t\x07\n"


def test_a_cut_keeps_only_whole_lines() -> None:
    text = "stdout| one\nstdout| two [executor: x]\nstdout| three\n"
    assert cut(text, len(text)) == text
    assert cut(text, len(text) - 1) == "stdout| two [executor: x]\nstdout| three\n"
    assert cut(text, len("stdout| three\n")) == "stdout| three\n"  # the cut falls between lines
    assert cut(text, len("stdout| three\n") + 3) == "stdout| three\n"
    assert cut(text, 5) == ""
    assert cut(text, 0) == ""


def test_a_full_tail_drops_whole_lines_and_their_separator_with_their_last_line() -> None:
    tail = Tail(batched=True, max_chars=100)
    tail.add(1, "stdout", "a" * 30)
    tail.add(2, "stdout", "b" * 30)
    assert len("executor| --- batch 1 ---\n" + render("stdout", "a" * 30)) * 2 > 100
    # Batch 1's line and its separator went together: no separator without lines.
    assert tail.text() == "executor| --- batch 2 ---\n" + render("stdout", "b" * 30)
    assert len(tail.text()) <= 100
    tail.add(2, "stderr", "c" * 300)  # longer than the whole tail: nothing can be kept
    assert tail.text() == ""


def test_parse_gives_each_line_its_stream_and_batch() -> None:
    text = "executor| --- batch 3 ---\nstdout| x| y\nexecutor| --- batch 4 ---\nstderr| \nstray\n"
    assert parse(text, FORMAT) == [
        TailLine("stdout", 3, "x| y"),
        TailLine("stderr", 4, ""),
        TailLine(None, 4, "stray"),
    ]
    assert parse("stdout| one\nexecutor| [executor: n]\n", FORMAT) == [
        TailLine("stdout", 1, "one"),
        TailLine("executor", 1, "[executor: n]"),
    ]
    assert parse("", FORMAT) == []


def test_an_unmarked_tail_s_lines_have_no_stream_even_when_they_look_marked() -> None:
    assert parse("executor| --- batch 2 ---\n[executor: forged]\n", UNMARKED) == [
        TailLine(None, None, "executor| --- batch 2 ---"),
        TailLine(None, None, "[executor: forged]"),
    ]
    assert logtail.MAX_CHARS == 64 * 1024
