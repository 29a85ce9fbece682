"""Reliable-bank cost: per training step, per checkpoint, and on disk at scale.

1. Per step, at B unlabeled images per step (default 8 and 64), with a free scorer so that only the bank's
   own work is timed: `ReliableBank.update` (in memory; nothing touches the disk between checkpoints)
   against the same update followed by what the previous layout did during the step, one file per
   accepted entry written with two fsyncs (temp file, fsync, rename, fsync of the folder). Every teacher
   output is accepted, the worst case. The fsync cost depends on the file system: a local disk is cheap,
   a cluster's parallel file system is not.
2. Per checkpoint: `bank_store.save` of a bank of N entries, first in full, then a delta after B x 50
   updates; and `bank_store.load` of it.
3. At scale: bytes and files for E entries (default 100,000) at S x S (default 256), extrapolated from a
   measured segment's bytes per entry (written for real at a smaller count), against one file per entry.

    python benchmarks/bank.py [--batches 8 64] [--entries 100000] [--size 256] [--measure 512]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from semi_llie.engine import bank_store
from semi_llie.method.bank import BankEntry, ReliableBank, to_pixels
from semi_llie.metrics.scorers import FunctionScorer

SCORER = FunctionScorer(lambda x: x.mean(dim=(1, 2, 3)), name="brightness")


def old_per_file_write(folder: Path, key: str, image: torch.Tensor, score: float, step: int) -> None:
    """The previous bank's write of one accepted entry: its own file, two fsyncs."""
    path = folder / f"{key}.pt"
    temporary = folder / f".{key}.tmp"
    with open(temporary, "wb") as handle:
        torch.save({"key": key, "image": to_pixels(image), "score": score, "step": step}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fd = os.open(folder, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def per_step(batch: int, size: int, steps: int, folder: Path) -> tuple[float, float]:
    """Seconds per step of `update` alone (entries in memory) and of `update` followed by the old layout's
    write of every accepted entry to its own file; every teacher output is accepted."""
    keys = [f"img{i:06d}" for i in range(batch)]
    indices = torch.arange(batch)
    student = torch.zeros(batch, 3, size, size)
    timings = []
    for write_files in (False, True):
        bank = ReliableBank(SCORER)
        started = time.perf_counter()
        for step in range(steps):
            teacher = torch.full((batch, 3, size, size), (step + 1) / (steps + 1))  # better every step
            update = bank.update(keys, indices, teacher, student, step)
            assert bool(update.accepted.all())
            if write_files:
                for key in keys:
                    entry = bank.get(key)
                    old_per_file_write(folder, key, entry.image, entry.score, step)
        timings.append((time.perf_counter() - started) / steps)
    return timings[0], timings[1]


def filled_bank(entries: int, size: int) -> ReliableBank:
    bank = ReliableBank(SCORER)
    generator = torch.Generator().manual_seed(0)
    for i in range(entries):
        pixels = torch.randint(0, 65536, (3, size, size), generator=generator, dtype=torch.int32).to(
            torch.uint16
        )
        bank.put(f"img{i:07d}", BankEntry(pixels, score=float(i), step=1, index=i, writer=0))
    return bank


def checkpoint_costs(entries: int, size: int, changed: int, root: Path) -> dict[str, float]:
    accelerator = Accelerator(cpu=True)
    bank = filled_bank(entries, size)
    timings = {}
    for step, label in ((1, "full"), (2, "delta")):
        if label == "delta":
            for i in range(changed):
                entry = bank.get(f"img{i:07d}")
                bank.put(f"img{i:07d}", BankEntry(entry.pixels, entry.score + 1, 2, entry.index, 0))
        staging = root / f".tmp-step-{step}"
        staging.mkdir(parents=True)
        started = time.perf_counter()
        bank_store.save(accelerator, bank, root, step, staging)
        timings[f"save_{label}"] = time.perf_counter() - started
        staging.rename(root / f"step-{step}")
    started = time.perf_counter()
    loaded = ReliableBank(SCORER)
    bank_store.load(loaded, root / "step-2", 1, owns=lambda i: torch.ones_like(i, dtype=torch.bool))
    timings["load"] = time.perf_counter() - started
    assert len(loaded) == entries
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--measure", type=int, default=512, help="entries actually written for sections 2-3")
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"1. bank cost per step at {args.size}x{args.size}, every teacher output accepted (worst case)")
    for batch in args.batches:
        with tempfile.TemporaryDirectory() as folder:
            in_memory, per_file = per_step(batch, args.size, args.steps, Path(folder))
        print(
            f"   B={batch:3d}: update in memory {in_memory * 1e3:7.1f} ms/step; update + one file with 2 "
            f"fsyncs per accepted entry (previous layout) {per_file * 1e3:7.1f} ms/step; "
            f"ratio {per_file / in_memory:5.2f}x"
        )

    changed = args.measure // 4  # a quarter of the entries improved since the previous checkpoint
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        timings = checkpoint_costs(args.measure, args.size, changed, root)
        segments = sorted((root / bank_store.SEGMENTS).iterdir())
        full_bytes = segments[0].stat().st_size if segments[0].name.startswith("00000001") else 0
    per_entry = full_bytes / args.measure
    print(f"2. checkpoint of a bank of {args.measure} entries at {args.size}x{args.size}")
    print(
        f"   save in full {timings['save_full']:.2f} s ({args.measure / timings['save_full']:.0f} entries/s),"
        " "
        f"delta of {changed} changed {timings['save_delta']:.2f} s, load {timings['load']:.2f} s"
    )
    total = args.entries * per_entry
    print(
        f"3. {args.entries:,} entries at {args.size}x{args.size} ({per_entry:,.0f} bytes per entry, measured)"
    )
    print(
        f"   checkpointed segments: {total / 2**30:.1f} GiB live, at most {bank_store.COMPACT_FACTOR}x that "
        f"with deltas; files: one per rank per checkpoint in the chain (e.g. 8 ranks x 10 = 80)"
    )
    print(
        f"   previous layout: {args.entries:,} files of ~{per_entry:,.0f} bytes, 2 fsyncs per accepted write"
    )


if __name__ == "__main__":
    main()
