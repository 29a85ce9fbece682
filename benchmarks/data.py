"""Labeled-stream throughput: WebDataset shards vs a plain folder-of-PNG Dataset, on the 115 LOL pairs.

Both sides read the same PNG bytes (low, high and the precomputed illumination map, extracted from the
shards into folders), decode them the same way and apply the same crop + dihedral augmentation; only the
storage and the pipeline differ. Prints samples/s for 0 and 2 DataLoader workers and the ratio, then the
shard stream with `cache_labeled` (decoded pairs kept in memory) once its cache is full.

    python benchmarks/data.py [--shards DIR] [--samples 96] [--rounds 3] [--batch-size 8] [--crop-size 256]

Without --shards it first builds them from ../shared/datasets/lol_v1_train115 into a temporary folder.
"""

from __future__ import annotations

import argparse
import itertools
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from semi_llie.data import BuildConfig, build_shards, labeled_loader
from semi_llie.data.augment import paired_crop
from semi_llie.data.streams import decode

LOL = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "lol_v1_train115"


class FolderPairs(Dataset):
    """The baseline: one PNG file per image, a map-style Dataset with shuffling by the DataLoader."""

    def __init__(self, root: Path, crop_size: int) -> None:
        self.stems = sorted(p.name.split(".")[0] for p in (root / "low").glob("*.png"))
        self.root, self.crop_size = root, crop_size

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        images = {
            name: decode((self.root / name / f"{self.stems[index]}.png").read_bytes())
            for name in ("low", "high", "illum")
        }
        generator = torch.Generator().manual_seed(index)
        crops = paired_crop(images, self.crop_size, generator)  # each 3×crop×crop uint8
        return {name: crop.float() / 255.0 for name, crop in crops.items()}


def extract_to_folders(shards: Path, root: Path) -> None:
    """Write every labeled sample's PNG members as root/{low,high,illum}/<key>.png (same bytes)."""
    for name in ("low", "high", "illum"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for shard in sorted(shards.glob("labeled-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                if suffix.endswith(".png"):
                    (root / suffix[:-4] / f"{key}.png").write_bytes(tar.extractfile(member).read())


def samples_per_second(batches, batch_size: int, samples: int, prefetched: int) -> float:
    """Samples/s over `samples`, after taking the `prefetched` batches the workers made while idle."""
    for _ in itertools.islice(batches, prefetched):
        pass
    start = time.perf_counter()
    count = sum(len(b["low"]) for b in itertools.islice(batches, max(1, samples // batch_size)))
    return count / (time.perf_counter() - start)


def best_rates(
    shard_loader, folder_loader, batch_size: int, samples: int, rounds: int, workers: int
) -> tuple[float, float]:
    """Best samples/s of each over `rounds` alternating rounds: the shared CPU's load drifts, and the
    best round is the least disturbed one. Start-up (workers, first shard) is excluded, and so are the
    batches (2 per worker) prefetched while the other loader was being timed."""
    shard_batches, folder_batches = iter(shard_loader), cycle(folder_loader)
    next(shard_batches), next(folder_batches)
    prefetched = 2 * workers  # DataLoader's default prefetch_factor
    shard_rate = folder_rate = 0.0
    for _ in range(rounds):
        shard_rate = max(shard_rate, samples_per_second(shard_batches, batch_size, samples, prefetched))
        folder_rate = max(folder_rate, samples_per_second(folder_batches, batch_size, samples, prefetched))
    return shard_rate, folder_rate


def cycle(loader):
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="existing shards of the 115 LOL pairs (built if absent)")
    parser.add_argument("--samples", type=int, default=96, help="samples per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as temporary:
        shards = args.shards
        if shards is None:
            shards = Path(temporary) / "shards"
            pairs = ((str(LOL / "low"), str(LOL / "high")),)
            build_shards(BuildConfig(out=shards, pairs=pairs, val_fraction=0.0, max_count=16, workers=2))
        folders = Path(temporary) / "folders"
        extract_to_folders(shards, folders)
        pairs_count = len(FolderPairs(folders, 1))
        print(f"{pairs_count} labeled pairs, batch {args.batch_size}, crop {args.crop_size}")
        for workers in (0, 2):
            stream = labeled_loader(shards, args.batch_size, args.crop_size, seed=0, num_workers=workers)
            pairs = FolderPairs(folders, args.crop_size)
            folder = DataLoader(
                pairs,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=workers,
                persistent_workers=workers > 0,
                drop_last=True,
            )
            shard_rate, folder_rate = best_rates(
                stream, folder, args.batch_size, args.samples, args.rounds, workers
            )
            ratio = shard_rate / folder_rate
            if workers == 0:
                uncached_rate = shard_rate
            print(
                f"workers={workers}: shards {shard_rate:6.1f} samples/s | folder {folder_rate:6.1f} samples/s"
                f" | shards/folder {ratio:.2f}x"
            )
        cached = iter(labeled_loader(shards, args.batch_size, args.crop_size, seed=0, cache_decoded=True))
        for _ in itertools.islice(cached, -(-pairs_count // args.batch_size)):  # one epoch fills the cache
            pass
        cached_rate = max(
            samples_per_second(cached, args.batch_size, args.samples, 0) for _ in range(args.rounds)
        )
        print(
            f"workers=0, cache_labeled: {cached_rate:6.1f} samples/s | cached/uncached shards "
            f"{cached_rate / uncached_rate:.1f}x"
        )


if __name__ == "__main__":
    main()
