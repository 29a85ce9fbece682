"""Atomic writes: a reader sees the old content or the new one, never a part, and no temporary file stays."""

from __future__ import annotations

import json

import pytest

from semi_llie.fileio import atomic_write, temporary_path, write_json_atomic, write_text_atomic


def test_an_error_while_writing_leaves_the_old_content_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as handle:
            handle.write("half of the new con")
            assert target.read_text() == "old\n"  # nothing visible before the commit
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_committed_write_replaces_the_target_whole(tmp_path):
    target = tmp_path / "manifest.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    assert (
        target.read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
    )  # sorted keys: deterministic bytes
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert not temporary_path(target).exists() and temporary_path(target).name == ".manifest.json.tmp"
