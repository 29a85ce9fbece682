"""Pack samples into deterministic WebDataset tar shards and write the manifest.

Pipeline: `collect_inputs` (sorted samples with splits and keys) -> this part's samples (`--part I/N`)
-> `encode_sample` in worker processes (decode, checks, illumination map, PNG) -> `ShardWriter` in sorted
order -> leak guard -> manifest. Same inputs and arguments give byte-identical shards and manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import tarfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from semi_llie.data.illumination import close_hashes, illumination_map, perceptual_hash
from semi_llie.data.images import encode_png, load_rgb8
from semi_llie.data.manifest import (
    FORMAT,
    MANIFEST_NAME,
    VERSION,
    part_manifest_name,
    unlabeled_brightness_check,
)
from semi_llie.data.problems import SkippableInputError
from semi_llie.data.sources import SPLITS, Sample, collect_inputs, hash_or_none
from semi_llie.errors import UserError
from semi_llie.fileio import commit, temporary_path, write_json_atomic

SMALL_FLAG = "smaller_than_crop"
BRIGHTNESS_FLAG = "unlabeled_unlike_labeled"
SPLIT_RULE = "near-duplicates-together"  # see BuildConfig.recorded_arguments


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the shards' contents (recorded in the manifest) plus how to run."""

    out: Path
    pairs: tuple[tuple[str, str], ...] = ()
    unlabeled: tuple[str, ...] = ()
    roots: tuple[str, ...] = ()
    val_fraction: float | None = None
    test_fraction: float | None = None
    test_fold: tuple[int, int] | None = None  # (index, count), 1-based
    labeled_fraction: float = 1.0
    drop_unused_pairs: bool = False
    labeled_lows_as_unlabeled: bool = False
    seed: int = 0
    max_count: int = 1000
    max_size_mb: float = 1024.0
    crop_size: int = 256
    skip_bad: bool = False
    allow_overlap: bool = False
    overlap_distance: int = 6
    part: tuple[int, int] | None = None  # (index, count), 1-based
    workers: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))  # callers may pass a str

    def recorded_arguments(self) -> dict[str, Any]:
        """The arguments that change the output: parts of one dataset must agree on all of them.

        `split_rule` names how pairs are drawn into splits; parts from a builder with another rule (or none:
        before near-duplicate pairs were kept together) may disagree on a pair's split and are not merged.
        """
        skip = {"out", "part", "workers", "overwrite"}
        return {**{k: v for k, v in asdict(self).items() if k not in skip}, "split_rule": SPLIT_RULE}


@dataclass
class EncodedSample:
    """One sample ready for the tar: member suffix -> bytes, plus its manifest record."""

    key: str
    members: dict[str, bytes]
    record: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return sum(len(v) for v in self.members.values())


def encode_sample(sample: Sample, crop_size: int) -> EncodedSample | SkippableInputError:
    """Decode and check one sample and encode its members (runs in a worker process).

    Returns the problem instead of raising so that the parent decides (stop, or skip with --skip-bad).
    """
    try:
        sources, pixels, hashes = {}, {}, {}
        for role, path in (("low", sample.low), ("high", sample.high)):
            if path is None:
                continue
            sources[role] = {"path": str(path), "sha256": _sha256_file(path)}
            pixels[role] = load_rgb8(path)
            hashes[role] = f"{perceptual_hash(pixels[role]):016x}"
        if "high" in pixels and pixels["high"].shape != pixels["low"].shape:
            raise SkippableInputError(
                [sample.low, sample.high],
                f"low/high pair of different sizes: {sample.low} is {_size(pixels['low'])}, "
                f"{sample.high} is {_size(pixels['high'])}",
            )
    except SkippableInputError as problem:
        return problem
    height, width = pixels["low"].shape[:2]
    info = {"key": sample.key, "split": sample.split, "subset": sample.subset, "size": [height, width]}
    info["sources"] = {role: source["path"] for role, source in sources.items()}
    members = {"low.png": encode_png(pixels["low"]), "illum.png": encode_png(illumination_map(pixels["low"]))}
    if "high" in pixels:
        members["high.png"] = encode_png(pixels["high"])
    members["json"] = json.dumps(info, sort_keys=True).encode()
    record = {**info, "sources": sources, "phash": hashes, "low_moments": channel_moments(pixels["low"])}
    record["flags"] = [SMALL_FLAG] if min(height, width) < crop_size else []
    return EncodedSample(sample.key, members, record)


def channel_moments(image: np.ndarray) -> list[list[float]]:
    """H×W×3 uint8 → [[mean R, G, B], [mean of squares R, G, B]] in [0, 1] units, rounded for stable JSON.

    Per-sample moments let any set of samples (a split, the parts of a merged build) be pooled exactly.
    """
    values = image.reshape(-1, 3).astype(np.float64) / 255.0
    return [np.round(values.mean(0), 8).tolist(), np.round((values**2).mean(0), 8).tolist()]


class ShardWriter:
    """Writes the tar shards of one split with fixed metadata, atomically.

    A shard holds one test subset only (so a test set can be read alone): a new subset starts a new shard.
    """

    def __init__(self, out: Path, prefix: str, max_count: int, max_bytes: int) -> None:
        self.out, self.prefix = out, prefix
        self.max_count, self.max_bytes = max_count, max_bytes
        self.entries: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._count = self._bytes = 0

    def add(self, sample: EncodedSample, subset: str) -> str:
        """Append a sample (starting a new shard when this one is full); return the shard name."""
        full = self._count >= self.max_count or (self._count and self._bytes + sample.nbytes > self.max_bytes)
        if self._tar is None or full or subset != self.entries[-1]["subset"]:
            self.close()
            self._open(subset)
        for suffix in sorted(sample.members):
            data = sample.members[suffix]
            info = tarfile.TarInfo(f"{sample.key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += sample.nbytes
        self.entries[-1]["has_high"] &= "high.png" in sample.members
        return self.entries[-1]["name"]

    def _open(self, subset: str) -> None:
        name = f"{self.prefix}-{len(self.entries):06d}.tar"
        self.entries.append({"name": name, "subset": subset, "has_high": True})
        self._tar = tarfile.open(temporary_path(self.out / name), "w", format=tarfile.GNU_FORMAT)
        self._count = self._bytes = 0

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        entry = self.entries[-1]
        commit(temporary_path(self.out / entry["name"]), self.out / entry["name"])
        entry.update(samples=self._count, bytes=(self.out / entry["name"]).stat().st_size)
        entry["sha256"] = _sha256_file(self.out / entry["name"])


def build_shards(config: BuildConfig) -> dict[str, Any]:
    """Build the shards (or one part of them) and write the (part) manifest; return the manifest."""
    manifest_path = config.out / (part_manifest_name(*config.part) if config.part else MANIFEST_NAME)
    if manifest_path.exists() and not config.overwrite:  # before reading any image
        raise UserError(f"{manifest_path} already exists; pass --overwrite to rebuild into {config.out}")
    inputs = collect_inputs(
        [(Path(lo), Path(hi)) for lo, hi in config.pairs],
        [Path(d) for d in config.unlabeled],
        [Path(d) for d in config.roots],
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        test_fold=config.test_fold,
        duplicate_distance=config.overlap_distance,
        hash_images=lambda paths: _hashes(paths, config.workers),
        labeled_fraction=config.labeled_fraction,
        drop_unused_pairs=config.drop_unused_pairs,
        labeled_lows_as_unlabeled=config.labeled_lows_as_unlabeled,
        seed=config.seed,
        skip_bad=config.skip_bad,
    )
    samples = part_samples(inputs.samples, config.part)
    _prepare_output(config, manifest_path)

    skipped = [problem.record() for problem in inputs.skipped]
    max_bytes = int(config.max_size_mb * 2**20)
    writers = {
        split: ShardWriter(config.out, _shard_prefix(split, config.part), config.max_count, max_bytes)
        for split in SPLITS
    }
    records: list[dict[str, Any]] = []
    try:
        # closing(): an early stop (a bad sample) shuts the worker pool here and now; left to the garbage
        # collector, Pool.terminate ran at some later moment and could hang the process.
        with closing(_encoded(samples, config)) as encoded_samples:
            progress = tqdm(encoded_samples, total=len(samples), desc="shards", unit="sample")
            for sample, encoded in zip(samples, progress, strict=True):
                if isinstance(encoded, SkippableInputError):
                    if not config.skip_bad:
                        raise encoded
                    skipped.append(encoded.record())
                    continue
                subset = sample.subset if sample.split == "test" else ""
                encoded.record["shard"] = writers[sample.split].add(encoded, subset)
                records.append(encoded.record)
        for writer in writers.values():
            writer.close()
        if not config.allow_overlap:
            check_overlaps(records, config.overlap_distance)
    except BaseException:
        # Never leave half a dataset that looks complete: remove every shard this run wrote.
        for writer in writers.values():
            for entry in writer.entries:
                for path in (config.out / entry["name"], temporary_path(config.out / entry["name"])):
                    path.unlink(missing_ok=True)
        raise

    shards = [{**entry, "split": split} for split, writer in writers.items() for entry in writer.entries]
    manifest = manifest_dict(
        config.recorded_arguments(), config.part, shards, records, skipped, inputs.ignored
    )
    write_json_atomic(manifest_path, manifest)
    return manifest


def part_samples(samples: list[Sample], part: tuple[int, int] | None) -> list[Sample]:
    """This part's samples: the I-th of N contiguous blocks of each split's sorted samples.

    Assigned after the seeded split, so the parts' union is exactly the whole build's samples.
    """
    if part is None:
        return samples
    index, count = part
    if not 1 <= index <= count:
        raise UserError(f"--part {index}/{count} is out of range; use I/N with 1 <= I <= N")
    chosen = []
    for split in SPLITS:
        of_split = [s for s in samples if s.split == split]
        n = len(of_split)
        chosen += of_split[(index - 1) * n // count : index * n // count]
    return chosen


def manifest_dict(
    arguments: dict[str, Any],
    part: tuple[int, int] | None,
    shards: list[dict[str, Any]],
    records: list[dict[str, Any]],
    skipped: list[dict[str, Any]],
    ignored: list[str],
    parts: int | None = None,
) -> dict[str, Any]:
    records = sorted(records, key=lambda r: (SPLITS.index(r["split"]), r["subset"], r["key"]))
    brightness = None if part else unlabeled_brightness_check(records)  # a part sees only its own samples
    splits = {
        split: {
            "samples": sum(s["samples"] for s in shards if s["split"] == split),
            "shards": sum(1 for s in shards if s["split"] == split),
        }
        for split in SPLITS
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "builder": {
            "command": "semi-llie shards build",
            "arguments": arguments,
            "part": {"index": part[0], "count": part[1]} if part else None,
            "merged_parts": parts,
        },
        "splits": splits,
        "shards": shards,
        "samples": records,
        "flags": {
            SMALL_FLAG: [r["key"] for r in records if SMALL_FLAG in r["flags"]],
            BRIGHTNESS_FLAG: brightness.outside if brightness else [],
        },
        "skipped": _unique_sorted(skipped),
        "ignored": sorted(set(ignored)),
    }


def check_overlaps(records: list[dict[str, Any]], max_distance: int) -> None:
    """Raise UserError listing every labeled or unlabeled image within `max_distance` pHash bits of a val/test
    image: a model trained on it would be scored on a copy of what it learnt."""
    training = [
        (r["split"], r["sources"][role]["path"], int(h, 16))
        for r in records
        if r["split"] in ("labeled", "unlabeled")
        for role, h in r["phash"].items()
    ]
    held_out = [
        (r["sources"][role]["path"], int(h, 16))
        for r in records
        if r["split"] in ("val", "test")
        for role, h in r["phash"].items()
    ]
    rows, cols = close_hashes([h for *_, h in training], [h for _, h in held_out], max_distance)
    found = sorted(
        {
            (training[i][0], training[i][1], held_out[j][0], (training[i][2] ^ held_out[j][1]).bit_count())
            for i, j in zip(rows, cols, strict=True)
        }
    )
    if found:
        listing = "; ".join(f"{split} {u} ~ {e} (distance {d})" for split, u, e, d in found)
        raise UserError(
            f"{len(found)} training image(s) duplicate val/test images (pHash distance <= {max_distance}): "
            f"{listing}; remove them from the training set or pass --allow-overlap"
        )


def _encoded(samples: list[Sample], config: BuildConfig) -> Iterator[EncodedSample | SkippableInputError]:
    """Encoded samples in input order, from `config.workers` processes (or this one)."""
    if config.workers <= 1:
        yield from (encode_sample(s, config.crop_size) for s in samples)
        return
    # spawn: worker processes must not inherit the parent's threads or open tar files.
    with multiprocessing.get_context("spawn").Pool(config.workers, initializer=_one_thread) as pool:
        yield from pool.imap(_encode_star, [(s, config.crop_size) for s in samples], chunksize=1)


def _hashes(paths: list[Path], workers: int) -> list[int | None]:
    """pHash of each image (None where unreadable), from `workers` processes (or this one)."""
    if workers <= 1 or len(paths) < 64:  # starting the processes costs more than hashing a few images
        return [hash_or_none(path) for path in paths]
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread) as pool:
        return pool.map(hash_or_none, paths, chunksize=8)


def _one_thread() -> None:
    """One of `workers` busy processes: no OpenCV threads on top of them (no oversubscription)."""
    cv2.setNumThreads(1)


def _encode_star(args: tuple[Sample, int]) -> EncodedSample | SkippableInputError:
    return encode_sample(*args)


def _prepare_output(config: BuildConfig, manifest_path: Path) -> None:
    config.out.mkdir(parents=True, exist_ok=True)
    if manifest_path.exists():
        if not config.overwrite:
            raise UserError(f"{manifest_path} already exists; pass --overwrite to rebuild into {config.out}")
        prefix_part = f"-part{config.part[0]:03d}of{config.part[1]:03d}-" if config.part else None
        for path in config.out.glob("*.tar"):
            is_part_file = "-part" in path.name
            if (prefix_part is None and not is_part_file) or (prefix_part and prefix_part in path.name):
                path.unlink()
        manifest_path.unlink()


def _shard_prefix(split: str, part: tuple[int, int] | None) -> str:
    return f"{split}-part{part[0]:03d}of{part[1]:03d}" if part else split


def _unique_sorted(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    unique = {json.dumps(r, sort_keys=True): r for r in records}
    return [unique[k] for k in sorted(unique)]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _size(pixels: np.ndarray) -> str:
    return f"{pixels.shape[1]}x{pixels.shape[0]}"
