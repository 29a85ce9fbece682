"""Atomic file writes: a reader (or a resumed run) sees the old content or the new one, never a part.

Every file the platform writes that something later reads back (manifests, shards, checkpoints' text files,
bank segments, sweep plans, enhanced images) goes through here: write a hidden temporary file beside the
target, fsync it, rename it over the target, fsync the folder so the rename survives a power cut.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temporary_path(path: Path) -> Path:
    """Where `path` is written before its commit: hidden, beside it (one file system: rename is atomic)."""
    return path.with_name(f".{path.name}.tmp")


def commit(temporary: Path, path: Path) -> None:
    """fsync `temporary`, rename it to `path`, fsync the folder."""
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_dir(path.parent)


@contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """`with atomic_write(path, "w") as handle:` writes `path` atomically; an error leaves it untouched."""
    temporary = temporary_path(path)
    try:
        with open(temporary, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json_atomic(path: Path, data: Any) -> None:
    """Deterministic JSON (sorted keys, one-space indent, final newline)."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
