"""The shared file handling: one JSON Lines policy for a cut last line, atomic writes, locks."""

from __future__ import annotations

import os

import pytest

from bpo.data.files import (
    BadLine,
    DirectoryBusyError,
    JsonLinesError,
    append_json_lines,
    iter_json_lines,
    lock_directory,
    read_json_lines,
    truncate_partial_line,
    write_atomic,
)


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_a_cut_last_line_is_skipped_only_in_a_file_bpo_appends_to(tmp_path):
    """`{"a": 2` with no newline is a kill mid-write in an appended file (skipped), and damage
    in an input file (reported with its line number); blank lines count but are skipped."""
    path = write(tmp_path / "f.jsonl", b'{"a": 1}\n\n{"a": 2')
    assert list(iter_json_lines(path, appended=True)) == [(1, {"a": 1})]
    lines = list(iter_json_lines(path, appended=False))
    assert lines[0] == (1, {"a": 1})
    assert lines[1][0] == 3 and isinstance(lines[1][1], BadLine)
    assert "not valid JSON" in lines[1][1].message
    with pytest.raises(JsonLinesError, match=r"f\.jsonl line 3: not valid JSON .*; fix it"):
        list(read_json_lines(path, appended=False, fix="fix it"))


def test_a_whole_last_line_without_its_newline_is_a_record_everywhere(tmp_path):
    path = write(tmp_path / "f.jsonl", b'{"a": 1}\n{"a": 2}')
    for appended in (True, False):
        assert list(read_json_lines(path, appended=appended)) == [(1, {"a": 1}), (2, {"a": 2})]


def test_a_damaged_middle_line_is_an_error_even_in_an_appended_file(tmp_path):
    path = write(tmp_path / "f.jsonl", b'{"a": 1}\n{"a": \n{"a": 3}\n')

    class StoreLikeError(ValueError):
        pass

    with pytest.raises(StoreLikeError, match=r"line 2: not valid JSON"):
        list(read_json_lines(path, appended=True, error=StoreLikeError))


def test_invalid_utf8_spoils_one_line_and_a_bom_none(tmp_path):
    path = write(tmp_path / "f.jsonl", b'\xef\xbb\xbf{"a": 1}\n\xff\xfe\n{"a": 3}\n')
    lines = list(iter_json_lines(path, appended=False))
    assert lines[0] == (1, {"a": 1}) and lines[2] == (3, {"a": 3})
    assert "not valid UTF-8" in lines[1][1].message


def test_repair_cuts_a_half_line_and_terminates_a_whole_one(tmp_path):
    """Bytes removed, worked by hand: the half line `{"b": ` is 6 bytes."""
    half = write(tmp_path / "half.jsonl", b'{"a": 1}\n{"b": ')
    assert truncate_partial_line(half) == 6
    assert half.read_bytes() == b'{"a": 1}\n'
    whole = write(tmp_path / "whole.jsonl", b'{"a": 1}\n{"b": 2}')
    assert truncate_partial_line(whole) == 0
    assert whole.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    clean = write(tmp_path / "clean.jsonl", b'{"a": 1}\n')
    assert truncate_partial_line(clean) == 0 and clean.read_bytes() == b'{"a": 1}\n'
    only_half = write(tmp_path / "only.jsonl", b'{"a"')
    assert truncate_partial_line(only_half) == 4 and only_half.read_bytes() == b""


def test_appending_after_a_repair_gives_the_uninterrupted_file(tmp_path):
    path = tmp_path / "f.jsonl"
    append_json_lines(path, [{"k": 1}, {"k": "é"}])
    with path.open("ab") as f:
        f.write(b'{"k": ')  # killed mid-line
    truncate_partial_line(path)
    append_json_lines(path, [{"k": 3}])
    assert path.read_text(encoding="utf-8") == '{"k": 1}\n{"k": "é"}\n{"k": 3}\n'


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_atomic(path, "old\n")
    write_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert not (tmp_path / f"results.json.{os.getpid()}.tmp").exists()


def test_a_second_lock_on_a_directory_is_refused_with_the_callers_error(tmp_path):
    first = lock_directory(tmp_path)
    try:
        with pytest.raises(DirectoryBusyError, match="being written by another process; wait"):
            lock_directory(tmp_path, busy="wait")
        with pytest.raises(KeyError):
            lock_directory(tmp_path, error=KeyError)
    finally:
        first.close()
    lock_directory(tmp_path).close()  # released: the next writer gets it
