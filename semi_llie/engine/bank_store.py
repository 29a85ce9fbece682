"""The reliable bank on disk: immutable segment files that checkpoints reference (format in ARCHITECTURE.md).

    OUTPUT_DIR/checkpoints/bank/{step:08d}-r{rank}-{token}.seg   one rank's entries written at one checkpoint
    OUTPUT_DIR/checkpoints/step-N/bank.json                      the ordered list of segments that make up
                                                                 the bank after step N

A checkpoint writes only what changed since the previous one: each rank appends one segment with the
entries it wrote since then (a delta), and the new `bank.json` is the previous chain plus these segments.
Reading a chain in order, a later record of a key replaces an earlier one. When the chain would hold more
than `COMPACT_FACTOR` records per live entry, every rank writes all its entries instead and the chain
restarts from those segments, so storage stays within a small multiple of the live bank. Segments are
never modified; the random token keeps a resumed run (which saves the same step numbers again) from
overwriting a segment that another kept checkpoint still references. A segment that no kept checkpoint
references (rotated away, or left by a save that was killed) is deleted by `collect_garbage`.

Segment file (torch.save, loadable with weights_only=True and mmap=True):
    {"format": 1, "metric": str, "rank": int, "world_size": int, "keys": [str] (n),
     "pixels": uint16 (n, 3, H, W), "score": float64 (n), "step": int64 (n), "index": int64 (n),
     "writer": int64 (n)}
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor

from semi_llie.engine.distributed import reduce_sums
from semi_llie.errors import UserError
from semi_llie.fileio import atomic_write
from semi_llie.method.bank import BankEntry, ReliableBank

SEGMENTS = "bank"  # folder under OUTPUT_DIR/checkpoints
BANK_FILE = "bank.json"  # in each step dir
FORMAT = 1
COMPACT_FACTOR = 2  # rewrite the whole bank when the chain holds more than this many records per entry


def write_segment(path: Path, bank: ReliableBank, keys: list[str], world_size: int) -> int:
    """Write the entries of `keys` to a new segment file (temp file, fsync, rename); return its size."""
    entries = [bank.get(key) for key in keys]
    record = {
        "format": FORMAT,
        "metric": bank.scorer.name,
        "rank": bank.rank,
        "world_size": world_size,
        "keys": keys,
        "pixels": torch.stack([e.pixels for e in entries]),
        "score": torch.tensor([e.score for e in entries], dtype=torch.float64),
        "step": torch.tensor([e.step for e in entries], dtype=torch.int64),
        "index": torch.tensor([e.index for e in entries], dtype=torch.int64),
        "writer": torch.tensor([e.writer for e in entries], dtype=torch.int64),
    }
    with atomic_write(path) as handle:
        torch.save(record, handle)
    return path.stat().st_size


def read_segment(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(
            f"bank segment {path} is missing although a checkpoint references it; restore it from a backup "
            "or resume from a checkpoint that does not need it"
        ) from None
    except Exception as error:
        raise UserError(f"bank segment {path} is unreadable ({error}); restore it from a backup") from error


def save(
    accelerator: Accelerator, bank: ReliableBank, checkpoints_root: Path, step: int, staging: Path
) -> None:
    """Write this rank's changes and (rank 0) `staging/bank.json`. A collective call: every rank, same step.

    Every segment is complete on disk (each rank fsyncs its own) before rank 0 writes `bank.json`.
    """
    world = accelerator.num_processes
    totals = reduce_sums(accelerator, {"dirty": len(bank.dirty), "live": len(bank)})
    chain_records = sum(segment["records"] for segment in bank.chain)
    compact = chain_records + totals["dirty"] > COMPACT_FACTOR * totals["live"]
    keys = bank.keys() if compact else sorted(bank.dirty)

    folder = checkpoints_root / SEGMENTS
    descriptor = None
    if keys:
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{step:08d}-r{bank.rank}-{secrets.token_hex(4)}.seg"
        size = write_segment(folder / name, bank, keys, world)
        descriptor = {
            "file": name,
            "rank": bank.rank,
            "world_size": world,
            "records": len(keys),
            "bytes": size,
        }
    descriptors = [d for d in gather_object([descriptor]) if d is not None]  # in rank order on every rank
    chain = descriptors if compact else bank.chain + descriptors
    if accelerator.is_main_process:  # the caller fsyncs the staging tree and the segment folder
        manifest = {
            "format": FORMAT,
            "metric": bank.scorer.name,
            "entries": int(totals["live"]),
            "segments": chain,
        }
        (staging / BANK_FILE).write_text(json.dumps(manifest, indent=1))
    bank.chain = chain
    bank.dirty.clear()


def load(
    bank: ReliableBank,
    step_dir: Path,
    world_size: int,
    owns: Callable[[Tensor], Tensor],
) -> None:
    """Replace the bank's entries by the ones this rank owns in `step_dir`'s bank.

    `owns(indices)` -> bool mask of the split indices this rank owns under the current world size. A segment
    written under this world size holds one rank's samples only, so only that rank reads it; after a change
    of world size every rank reads every segment and keeps its own samples (memory stays O(entries / ranks):
    segments are memory-mapped and only owned rows are copied).
    """
    bank.clear()
    manifest_path = step_dir / BANK_FILE
    if not manifest_path.is_file():
        return  # a checkpoint of a run without a bank: start empty
    manifest = json.loads(manifest_path.read_text())
    if manifest["metric"] != bank.scorer.name:
        raise UserError(
            f"the bank in {step_dir} was scored with {manifest['metric']!r} but this run scores with "
            f"{bank.scorer.name!r}; scores are incomparable: keep bank.metric or start a new output_dir"
        )
    folder = step_dir.parent / SEGMENTS
    for segment in manifest["segments"]:
        if segment["world_size"] == world_size and segment["rank"] != bank.rank:
            continue  # another rank's samples under this partition
        record = read_segment(folder / segment["file"])
        mine = owns(record["index"]).nonzero().flatten().tolist()
        for row in mine:
            entry = BankEntry(
                pixels=record["pixels"][row].clone(),
                score=float(record["score"][row]),
                step=int(record["step"][row]),
                index=int(record["index"][row]),
                writer=int(record["writer"][row]),
            )
            bank.put(record["keys"][row], entry, dirty=False)
    bank.chain = list(manifest["segments"])


def referenced_segments(step_dirs: list[Path]) -> set[str]:
    names: set[str] = set()
    for step_dir in step_dirs:
        path = step_dir / BANK_FILE
        if path.is_file():
            names.update(segment["file"] for segment in json.loads(path.read_text())["segments"])
    return names


def collect_garbage(checkpoints_root: Path, step_dirs: list[Path]) -> list[Path]:
    """Delete segments (and temp files) that none of `step_dirs` references; return what was deleted."""
    folder = checkpoints_root / SEGMENTS
    if not folder.is_dir():
        return []
    keep = referenced_segments(step_dirs)
    doomed = [path for path in folder.iterdir() if path.name not in keep]
    for path in doomed:
        path.unlink()
    return doomed
