"""Streaming pipelines over the shards: labeled, unlabeled (infinite, resumable) and eval (finite, in order).

Who reads what, in two levels.
1. Ranks own samples for the whole run (`rank_assignment`, `owner_ranks`): with at least as many shards as
   ranks, rank r owns shards r, r+W, r+2W, ... (manifest order); with fewer, every rank reads all shards and
   owns the samples whose split index (position in manifest order) is r mod W. Ownership never changes
   between epochs, so a reliable-bank entry is only ever written by one rank (semi_llie.method.bank).
2. A rank's DataLoader workers split its shards per epoch: the rank's shards are permuted by rng(seed, e),
   then worker w takes shards w, w+N, ... (N workers), or, with fewer shards than workers, every N-th of the
   rank's samples. Each worker shuffles its samples with a buffer seeded by (seed, rank, worker, e) and
   augments sample number i with a generator seeded by (seed, rank, worker, i).
Either way the readers' samples are disjoint and cover the split once: the eval stream relies on this.

Each reader yields whole batches; the DataLoader takes batch b from worker b % num_workers, so "the
trainer consumed B batches" tells every worker how many of its samples were used. Resuming skips them:
whole epochs by the counts in the manifest without reading anything, the rest by reading tar bytes without
decoding. Samples skipped as unreadable (`skip_bad`) are reported with the batch that follows them
(`batch["skipped"]`); the trainer hands their keys back on resume so the count stays exact.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from semi_llie.data.augment import paired_crop, random_exposure, resize_square, strong_view
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
    """The shards a reader opens, in order, and which of their samples it keeps.

    A sample is kept when its split index (position in the split, manifest order) is `rank_offset` mod
    `rank_stride` (the rank owns it), and then when its rank-local count is `worker_offset` mod
    `worker_stride` (this worker reads it).
    """

    shards: list[tuple[ShardEntry, int]]  # each shard with the split index of its first sample
    rank_stride: int = 1
    rank_offset: int = 0
    worker_stride: int = 1
    worker_offset: int = 0

    @property
    def num_samples(self) -> int:
        owned = sum(
            len(
                range(
                    _first_at_or_after(first, self.rank_stride, self.rank_offset),
                    first + shard.samples,
                    self.rank_stride,
                )
            )
            for shard, first in self.shards
        )
        return len(range(self.worker_offset, owned, self.worker_stride))


def _first_at_or_after(start: int, stride: int, offset: int) -> int:
    return start + (offset - start) % stride


def indexed_shards(shards: list[ShardEntry]) -> list[tuple[ShardEntry, int]]:
    """Each shard with the split index of its first sample (shards in manifest order)."""
    firsts = np.cumsum([0] + [shard.samples for shard in shards[:-1]])
    return [(shard, int(first)) for shard, first in zip(shards, firsts, strict=True)]


def rank_assignment(shards: list[ShardEntry], rank: int, world_size: int) -> Assignment:
    """The samples `rank` owns for the whole run (level 1 of the module docstring)."""
    indexed = indexed_shards(shards)
    if len(shards) >= world_size:
        return Assignment(indexed[rank::world_size])
    return Assignment(indexed, rank_stride=world_size, rank_offset=rank)


def owner_ranks(shards: list[ShardEntry], world_size: int, indices: Tensor) -> Tensor:
    """The rank that owns each split index (int64 tensor in, int64 tensor out), as `rank_assignment` deals."""
    if len(shards) < world_size:
        return indices % world_size
    firsts = torch.tensor([first for _, first in indexed_shards(shards)], dtype=torch.int64)
    shard_positions = torch.searchsorted(firsts, indices, right=True) - 1
    return shard_positions % world_size


def assign(shards: list[ShardEntry], reader: Reader, epoch: int | None = None, seed: int = 0) -> Assignment:
    """The reader's share: its rank's samples, then (permuted per `epoch` if given) its worker's."""
    owned = rank_assignment(shards, reader.rank, reader.world_size)
    mine = list(owned.shards)
    if epoch is not None:
        mine = [mine[i] for i in np.random.default_rng([seed, epoch]).permutation(len(mine))]
    if len(mine) >= reader.num_workers:
        return Assignment(mine[reader.worker :: reader.num_workers], owned.rank_stride, owned.rank_offset)
    return Assignment(mine, owned.rank_stride, owned.rank_offset, reader.num_workers, reader.worker)


class ShardReadError(UserError):
    """A shard could not be read past some point (truncated or corrupt tar)."""


def read_samples(
    manifest: Manifest,
    assignment: Assignment,
    on_broken_shard: Callable[[ShardEntry], None] | None = None,
) -> Iterator[RawSample]:
    """Raw (undecoded) samples of an assignment, in shard order, with `__index__` (split index) and
    `__shard__` (shard name) added. A shard that breaks off raises ShardReadError naming it, or, given
    `on_broken_shard`, is reported to it and the next shard follows."""
    kept = 0  # samples of this rank seen so far: the worker-level split counts them
    for shard, first in assignment.shards:
        position, key = -1, None
        try:
            try:
                for position, sample in enumerate(tarfile_samples([{"url": manifest.url(shard)}])):
                    index, key = first + position, sample["__key__"]
                    if index % assignment.rank_stride != assignment.rank_offset:
                        continue
                    kept += 1
                    if (kept - 1) % assignment.worker_stride == assignment.worker_offset:
                        yield {**sample, "__index__": index, "__shard__": shard.name}
            except (OSError, EOFError, ValueError, tarfile.TarError) as error:
                after = f"after sample {key!r} (#{position})" if key is not None else "at its first sample"
                raise ShardReadError(
                    f"shard {manifest.url(shard)} cannot be read {after} ({error}); it is truncated or "
                    "corrupt: rebuild it (`semi-llie shards verify` checks every shard's sha256)"
                ) from error
            if position + 1 < shard.samples:
                raise ShardReadError(
                    f"shard {manifest.url(shard)} ended after {position + 1} of its {shard.samples} samples; "
                    "it is truncated: rebuild it (`semi-llie shards verify` checks every shard's sha256)"
                )
        except ShardReadError:
            if on_broken_shard is None:
                raise
            on_broken_shard(shard)


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
    small crops of large images, many per batch, otherwise spend the step decoding whole PNGs (on LOL more
    than the model's step: docs/results/design_measurements.md).
    `augment="exposure"` retakes the low crop with ×U(0.5, 1.5) the light (`random_exposure`); the target and
    the illumination map stay as they are, so the model learns that the input's exposure does not change
    the answer (the supervised control of the lowlight strong view: docs/results/label_efficiency.md).
    """

    def __init__(self, crop_size: int, cache_decoded: bool = False, augment: str = "none") -> None:
        self.crop_size = crop_size
        self.decoded: dict[str, dict[str, Tensor]] | None = {} if cache_decoded else None
        self.augment = augment

    def __call__(self, raw: RawSample, generator: torch.Generator) -> dict[str, Any]:
        images = self.decoded.get(raw["__key__"]) if self.decoded is not None else None
        if images is None:
            images = {name: decode(raw[f"{name}.png"]) for name in ("low", "high", "illum")}  # 3×H×W uint8
            if self.decoded is not None:
                self.decoded[raw["__key__"]] = images
        crops = paired_crop(images, self.crop_size, generator)  # each 3×crop×crop uint8
        sample = {"key": raw["__key__"], **{name: crop.float() / 255.0 for name, crop in crops.items()}}
        if self.augment == "exposure":
            sample["low"] = random_exposure(sample["low"], generator)
        return sample


class UnlabeledSample:
    """Raw unlabeled sample -> `{"key", "weak", "strong", "illum": 3×S×S}`, S = unlabeled_size."""

    def __init__(self, unlabeled_size: int, strong_augment: str = "paper") -> None:
        self.unlabeled_size = unlabeled_size
        self.strong_augment = strong_augment

    def __call__(self, raw: RawSample, generator: torch.Generator) -> dict[str, Any]:
        weak = resize_square(decode(raw["low.png"]), self.unlabeled_size)  # 3×S×S
        return {
            "key": raw["__key__"],
            "weak": weak,
            "strong": strong_view(weak, generator, self.strong_augment),
            "illum": resize_square(decode(raw["illum.png"]), self.unlabeled_size),
        }


class TrainingStream(IterableDataset):
    """Infinite, deterministic, resumable stream of batches of one split (see the module docstring).

    `make_sample(raw, generator)` decodes and augments one sample using only `generator`'s randomness.
    A sample that cannot be decoded, or a shard that breaks off, stops the stream with an error naming the
    shard and the sample; with `skip_bad` it is skipped instead and reported in the next batch's
    `"skipped"` list ("shard/key" strings; a broken-off shard as "shard/*"). `known_bad` is what earlier
    runs reported (the trainer keeps it in its checkpoints): resuming does not count those samples as used.
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
        skip_bad: bool = False,
        known_bad: frozenset[str] = frozenset(),
    ) -> None:
        if not manifest.shards_of(split):
            raise UserError(f"{manifest.location} has no {split} shards; rebuild with {split} data")
        self.manifest, self.split, self.make_sample = manifest, split, make_sample
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start_batch, self.shuffle_buffer = start_batch, shuffle_buffer
        self.skip_bad, self.known_bad = skip_bad, known_bad

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader = current_reader(self.rank, self.world_size, first_batch=self.start_batch)
        to_skip = (
            batches_seen_by_worker(self.start_batch, reader.worker, reader.num_workers) * self.batch_size
        )
        shards = self.manifest.shards_of(self.split)
        index, epoch, batch, skipped = 0, 0, [], []
        while True:
            assignment = assign(shards, reader, epoch=epoch, seed=self.seed)
            if assignment.num_samples == 0:
                raise UserError(
                    f"the {self.split} split has {self.manifest.num_samples(self.split)} samples, too few "
                    f"for world_size × num_workers = {reader.count} readers (rank {reader.rank}, worker "
                    f"{reader.worker} got none); use fewer workers or more data"
                )
            if to_skip >= assignment.num_samples and not self.known_bad:
                # A whole epoch already consumed: skip it without reading (known bad samples make the
                # epoch's usable count smaller than the manifest's, so then the epoch is read below).
                to_skip -= assignment.num_samples
                index += assignment.num_samples
                epoch += 1
                continue
            order_rng = np.random.default_rng([self.seed, reader.rank, reader.worker, epoch])
            for raw in shuffled(self._raw_samples(assignment, skipped), self.shuffle_buffer, order_rng):
                name = f"{raw['__shard__']}/{raw['__key__']}"
                if to_skip:  # consumed before the resume: skip without decoding
                    to_skip -= name not in self.known_bad  # a known bad sample was never in a batch
                    index += 1
                    continue
                generator = torch.Generator().manual_seed(_sample_seed(self.seed, reader, index))
                index += 1
                try:
                    sample = self.make_sample(raw, generator)
                except Exception as error:  # noqa: BLE001 - any decoding failure is named or counted
                    if not self.skip_bad:
                        raise UserError(
                            f"sample {raw['__key__']!r} of shard {raw['__url__']} "
                            f"cannot be decoded ({type(error).__name__}: {error}); rebuild the shard, or set "
                            "data.skip_bad_samples=true to skip such samples (they are counted and logged)"
                        ) from error
                    skipped.append(name)
                    continue
                batch.append({**sample, "index": torch.tensor(raw["__index__"])})
                if len(batch) == self.batch_size:
                    yield {**collate(batch), "skipped": skipped}
                    batch, skipped = [], []
            epoch += 1

    def _raw_samples(self, assignment: Assignment, skipped: list[str]) -> Iterator[RawSample]:
        """`read_samples`; with `skip_bad`, a shard that breaks off ends early and is reported once."""

        def report(shard: ShardEntry) -> None:
            if f"{shard.name}/*" not in self.known_bad:
                skipped.append(f"{shard.name}/*")

        return read_samples(self.manifest, assignment, report if self.skip_bad else None)


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
    skip_bad: bool = False,
    known_bad: frozenset[str] = frozenset(),
    cache_decoded: bool = False,
    augment: str = "none",
) -> DataLoader:
    """Infinite loader of labeled batches `{"key": [str], "index": B, "low", "high", "illum": B×3×crop×crop,
    "skipped": [str]}`.

    `start_batch` = batches this rank already consumed (from the checkpoint); the loader continues there.
    `cache_decoded` keeps the decoded pairs in memory after their first use, `augment` ("none" or
    "exposure") changes the low crop's exposure (see `LabeledSample`).
    """
    stream = TrainingStream(
        open_location(location),
        "labeled",
        LabeledSample(crop_size, cache_decoded, augment),
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_batch=start_batch,
        shuffle_buffer=shuffle_buffer,
        skip_bad=skip_bad,
        known_bad=known_bad,
    )
    return _loader(stream, num_workers)


def unlabeled_loader(
    location: str | os.PathLike[str] | Manifest,
    batch_size: int,
    unlabeled_size: int = 256,
    *,
    strong_augment: str = "paper",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    start_batch: int = 0,
    shuffle_buffer: int = 64,
    skip_bad: bool = False,
    known_bad: frozenset[str] = frozenset(),
) -> DataLoader:
    """Infinite loader of unlabeled batches `{"key": [str], "index": B, "weak", "strong", "illum": B×3×S×S,
    "skipped": [str]}`; "index" is each sample's split index, which decides its owner rank."""
    stream = TrainingStream(
        open_location(location),
        "unlabeled",
        UnlabeledSample(unlabeled_size, strong_augment),
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_batch=start_batch,
        shuffle_buffer=shuffle_buffer,
        skip_bad=skip_bad,
        known_bad=known_bad,
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
