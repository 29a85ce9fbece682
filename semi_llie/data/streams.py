"""Streaming pipelines over the shards: labeled, unlabeled (infinite, resumable) and eval (finite, in order).

Who reads what. The G = world_size × num_workers readers (rank r, DataLoader worker w, global index
g = r·num_workers + w) split a split's shards: reader g takes shards g, g+G, g+2G, ... When there are fewer
shards than readers, every reader reads all shards and keeps samples g, g+G, ... instead (correct, more
I/O; rebuild with a smaller --max-count for speed). Either way the readers' samples are disjoint and cover
the split once: the eval stream relies on this.

Training streams (infinite). Epoch e: the shards are permuted by rng(seed, e), identical on every reader,
then split as above; each reader shuffles its samples with a buffer seeded by (seed, rank, worker, e) and
augments sample number i with a generator seeded by (seed, rank, worker, i). Each reader yields whole
batches; the DataLoader takes batch b from worker b % num_workers, so "the trainer consumed B batches"
tells every worker how many of its samples were used. Resuming skips them: whole epochs by the counts in
the manifest without reading anything, the rest by reading tar bytes without decoding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from semi_llie.data.augment import paired_crop, resize_square, strong_view
from semi_llie.data.images import decode_png
from semi_llie.data.manifest import Manifest, ShardEntry
from semi_llie.errors import UserError

RawSample = dict[str, Any]  # "__key__" plus member suffix -> bytes, as read from the tar


@dataclass(frozen=True)
class Reader:
    """One of the world_size × num_workers readers of a stream."""

    rank: int
    world_size: int
    worker: int
    num_workers: int

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


def current_reader(rank: int, world_size: int, first_batch: int = 0) -> Reader:
    """The reader this code runs as: `rank` from the caller, the worker from the DataLoader (if any).

    A DataLoader asks its workers for batches round-robin starting at worker 0, while the stream being
    resumed at batch `first_batch` continues with the worker that made batch `first_batch`; so DataLoader
    worker k plays the role of worker (k + first_batch) mod num_workers.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    info = get_worker_info()
    if info is None:
        return Reader(rank, world_size, 0, 1)
    return Reader(rank, world_size, (info.id + first_batch) % info.num_workers, info.num_workers)


@dataclass(frozen=True)
class Assignment:
    """The shards a reader opens and which of their samples (in reading order) it keeps."""

    shards: list[ShardEntry]
    stride: int
    offset: int

    @property
    def num_samples(self) -> int:
        return len(range(self.offset, sum(s.samples for s in self.shards), self.stride))


def assign(shards: list[ShardEntry], reader: Reader) -> Assignment:
    if len(shards) >= reader.count:
        return Assignment(shards[reader.index :: reader.count], 1, 0)
    return Assignment(shards, reader.count, reader.index)


def read_samples(manifest: Manifest, assignment: Assignment) -> Iterator[RawSample]:
    """Raw (undecoded) samples of an assignment, in shard order."""
    sources = [{"url": manifest.url(shard)} for shard in assignment.shards]
    for position, sample in enumerate(tarfile_samples(sources)):
        if position % assignment.stride == assignment.offset:
            yield sample


def shuffled(samples: Iterator[RawSample], buffer_size: int, rng: np.random.Generator) -> Iterator[RawSample]:
    """Deterministic shuffle buffer: once full, emit a random element for each new one; drain at the end."""
    buffer: list[RawSample] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            yield _pop_random(buffer, rng)
    while buffer:
        yield _pop_random(buffer, rng)


def _pop_random(buffer: list[RawSample], rng: np.random.Generator) -> RawSample:
    index = int(rng.integers(len(buffer)))
    buffer[index], buffer[-1] = buffer[-1], buffer[index]
    return buffer.pop()


def batches_seen_by_worker(batches: int, worker: int, num_workers: int) -> int:
    """How many of `batches` (consumed in DataLoader order b = 0, 1, ...) came from `worker`."""
    return len(range(worker, batches, num_workers))


def decode(data: bytes) -> Tensor:
    """PNG bytes -> 3×H×W uint8."""
    return torch.from_numpy(decode_png(data)).permute(2, 0, 1)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """List of per-sample dicts -> one batch: tensors stacked (B first), keys as a list of str."""
    return {
        name: [s[name] for s in samples] if name == "key" else torch.stack([s[name] for s in samples])
        for name in samples[0]
    }


class LabeledSample:
    """Raw labeled sample -> `{"key", "low", "high", "illum": 3×crop×crop}` (same crop and flip for all).

    With `cache_decoded` the decoded pairs stay in memory (9 bytes per pixel per pair, in each reader):
    small crops of large images, many per batch, otherwise spend the step decoding PNGs (LOL, batch 36 of
    32×32 crops: ~0.8 s of decoding per step on 2 cores, more than the model's step).
    """

    def __init__(self, crop_size: int, cache_decoded: bool = False) -> None:
        self.crop_size = crop_size
        self.decoded: dict[str, dict[str, Tensor]] | None = {} if cache_decoded else None

    def __call__(self, raw: RawSample, generator: torch.Generator) -> dict[str, Any]:
        images = self.decoded.get(raw["__key__"]) if self.decoded is not None else None
        if images is None:
            images = {name: decode(raw[f"{name}.png"]) for name in ("low", "high", "illum")}  # 3×H×W uint8
            if self.decoded is not None:
                self.decoded[raw["__key__"]] = images
        crops = paired_crop(images, self.crop_size, generator)  # each 3×crop×crop uint8
        return {"key": raw["__key__"], **{name: crop.float() / 255.0 for name, crop in crops.items()}}


class UnlabeledSample:
    """Raw unlabeled sample -> `{"key", "weak", "strong", "illum": 3×S×S}`, S = unlabeled_size."""

    def __init__(self, unlabeled_size: int) -> None:
        self.unlabeled_size = unlabeled_size

    def __call__(self, raw: RawSample, generator: torch.Generator) -> dict[str, Any]:
        weak = resize_square(decode(raw["low.png"]), self.unlabeled_size)  # 3×S×S
        return {
            "key": raw["__key__"],
            "weak": weak,
            "strong": strong_view(weak, generator),
            "illum": resize_square(decode(raw["illum.png"]), self.unlabeled_size),
        }


class TrainingStream(IterableDataset):
    """Infinite, deterministic, resumable stream of batches of one split (see the module docstring).

    `make_sample(raw, generator)` decodes and augments one sample using only `generator`'s randomness.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        make_sample: Callable[[RawSample, torch.Generator], dict[str, Any]],
        batch_size: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
        start_batch: int = 0,
        shuffle_buffer: int = 64,
    ) -> None:
        if not manifest.shards_of(split):
            raise UserError(f"{manifest.location} has no {split} shards; rebuild with {split} data")
        self.manifest, self.split, self.make_sample = manifest, split, make_sample
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start_batch, self.shuffle_buffer = start_batch, shuffle_buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader = current_reader(self.rank, self.world_size, first_batch=self.start_batch)
        to_skip = (
            batches_seen_by_worker(self.start_batch, reader.worker, reader.num_workers) * self.batch_size
        )
        shards = self.manifest.shards_of(self.split)
        index, epoch, batch = 0, 0, []
        while True:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(len(shards))
            assignment = assign([shards[i] for i in permutation], reader)
            if assignment.num_samples == 0:
                raise UserError(
                    f"the {self.split} split has {self.manifest.num_samples(self.split)} samples, fewer than "
                    f"world_size × num_workers = {reader.count}; use fewer workers or more data"
                )
            if to_skip >= assignment.num_samples:  # a whole epoch already consumed: skip without reading
                to_skip -= assignment.num_samples
                index += assignment.num_samples
                epoch += 1
                continue
            order_rng = np.random.default_rng([self.seed, reader.rank, reader.worker, epoch])
            for raw in shuffled(read_samples(self.manifest, assignment), self.shuffle_buffer, order_rng):
                if to_skip:  # consumed before the resume: skip without decoding
                    to_skip -= 1
                    index += 1
                    continue
                generator = torch.Generator().manual_seed(_sample_seed(self.seed, reader, index))
                batch.append(self.make_sample(raw, generator))
                index += 1
                if len(batch) == self.batch_size:
                    yield collate(batch)
                    batch = []
            epoch += 1


class EvalStream(IterableDataset):
    """Finite stream of whole images, `{"key": [str], "low", ["high",] "illum": 1×3×H×W}`.

    Each sample of the split is yielded by exactly one (rank, worker); a reader's samples come in
    manifest order. "high" is absent for test sets without ground truth.
    """

    def __init__(
        self, manifest: Manifest, split: str, subset: str | None, rank: int, world_size: int
    ) -> None:
        self.shards = manifest.shards_of(split, subset)
        if not self.shards:
            which = f"{split} (subset {subset!r})" if subset else split
            raise UserError(f"{manifest.location} has no {which} shards; rebuild with {split} data")
        self.manifest, self.rank, self.world_size = manifest, rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        assignment = assign(self.shards, current_reader(self.rank, self.world_size))
        for raw in read_samples(self.manifest, assignment):
            sample = {"key": raw["__key__"]}
            for name in ("low", "high", "illum"):
                if f"{name}.png" in raw:
                    sample[name] = decode(raw[f"{name}.png"]).float() / 255.0
            yield collate([sample])


def _sample_seed(seed: int, reader: Reader, index: int) -> int:
    return int(np.random.SeedSequence([seed, reader.rank, reader.worker, index]).generate_state(1)[0])


def open_location(location: str | os.PathLike[str] | Manifest) -> Manifest:
    return location if isinstance(location, Manifest) else Manifest.open(location)


def _loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    # The datasets batch themselves (batch_size=None) so that a batch never mixes workers: resuming needs it.
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)


def labeled_loader(
    location: str | os.PathLike[str] | Manifest,
    batch_size: int,
    crop_size: int = 256,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    start_batch: int = 0,
    shuffle_buffer: int = 64,
    cache_decoded: bool = False,
) -> DataLoader:
    """Infinite loader of labeled batches `{"key": [str], "low", "high", "illum": B×3×crop×crop}`.

    `start_batch` = batches this rank already consumed (from the checkpoint); the loader continues there.
    `cache_decoded` keeps the decoded pairs in memory after their first use (see `LabeledSample`).
    """
    stream = TrainingStream(
        open_location(location),
        "labeled",
        LabeledSample(crop_size, cache_decoded),
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_batch=start_batch,
        shuffle_buffer=shuffle_buffer,
    )
    return _loader(stream, num_workers)


def unlabeled_loader(
    location: str | os.PathLike[str] | Manifest,
    batch_size: int,
    unlabeled_size: int = 256,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    start_batch: int = 0,
    shuffle_buffer: int = 64,
) -> DataLoader:
    """Infinite loader of unlabeled batches `{"key": [str], "weak", "strong", "illum": B×3×S×S}`."""
    stream = TrainingStream(
        open_location(location),
        "unlabeled",
        UnlabeledSample(unlabeled_size),
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_batch=start_batch,
        shuffle_buffer=shuffle_buffer,
    )
    return _loader(stream, num_workers)


def eval_loader(
    location: str | os.PathLike[str] | Manifest,
    split: str = "val",
    *,
    subset: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> DataLoader:
    """Finite loader of whole images `{"key": [str], "low", "high", "illum": 1×3×H×W}`.

    Every sample of the split (or test `subset`) is yielded once across all ranks and workers.
    """
    stream = EvalStream(open_location(location), split, subset, rank, world_size)
    return DataLoader(stream, batch_size=None, num_workers=num_workers)
