"""Find the samples to pack: pairs matched by stem, unlabeled images, the seed layout, the seeded split.

Every problem with the inputs names the files involved. Problems that concern single files (an unmatched
file, a non-image file) are `SkippableInputError`s: the builder stops on them unless `--skip-bad`, in which
case they are listed in the manifest. Problems that make the input ambiguous (duplicate stems, duplicate
keys, an empty or missing folder) always stop the build.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semi_llie.data.illumination import close_hashes, perceptual_hash
from semi_llie.data.images import BadImageError, is_image_file, load_rgb8
from semi_llie.data.problems import SkippableInputError
from semi_llie.errors import UserError

SPLITS = ("labeled", "unlabeled", "val", "test")

# Documentation and metadata that dataset folders commonly carry (README.md, MANIFEST.tsv, ...): ignored
# (and listed in the manifest) rather than reported as "not an image".
SIDECAR_SUFFIXES = frozenset({".md", ".txt", ".tsv", ".csv", ".json", ".yaml", ".yml", ".rst"})

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Sample:
    """One sample to build. `high` is None for unlabeled images and for test sets without ground truth."""

    key: str
    split: str
    subset: str
    low: Path
    high: Path | None = None


@dataclass
class Inputs:
    samples: list[Sample] = field(default_factory=list)
    skipped: list[SkippableInputError] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


@dataclass
class _Collector:
    """Accumulates samples and problems; `skip_bad` decides whether a skippable problem raises."""

    skip_bad: bool
    inputs: Inputs = field(default_factory=Inputs)

    def problem(self, error: SkippableInputError) -> None:
        if not self.skip_bad:
            raise error
        self.inputs.skipped.append(error)

    def list_images(self, folder: Path) -> dict[str, Path]:
        return images_by_stem(folder, self.problem, self.inputs.ignored)

    def pairs(self, low_dir: Path, high_dir: Path) -> list[tuple[str, Path, Path]]:
        return pairs_by_stem(low_dir, high_dir, self.problem, self.inputs.ignored)


def raise_problem(error: SkippableInputError) -> None:
    raise error


def images_by_stem(
    folder: Path,
    on_problem: Callable[[SkippableInputError], None] = raise_problem,
    ignored: list[str] | None = None,
) -> dict[str, Path]:
    """Images under `folder` (recursively) by relative stem, e.g. "night/0001" for night/0001.png.

    Hidden files and sidecars (README.md, ...) are skipped and appended to `ignored`; a file with an unknown
    suffix goes to `on_problem`; two images with one stem, or no image at all, are a UserError.
    """
    if not folder.is_dir():
        raise UserError(f"input folder {folder} does not exist or is not a folder; check the path")
    images: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() in SIDECAR_SUFFIXES:
            if ignored is not None:
                ignored.append(str(path))
            continue
        if not is_image_file(path):
            on_problem(SkippableInputError([path], f"{path} is not an image file (unknown suffix)"))
            continue
        stem = relative.with_suffix("").as_posix()
        if stem in images:
            raise UserError(
                f"duplicate stem {stem!r} in {folder}: {images[stem]} and {path}; "
                "rename or remove one of them so every stem names one image"
            )
        images[stem] = path
    if not images:
        raise UserError(f"input folder {folder} contains no images; check the path")
    return images


def pairs_by_stem(
    low_dir: Path,
    high_dir: Path,
    on_problem: Callable[[SkippableInputError], None] = raise_problem,
    ignored: list[str] | None = None,
) -> list[tuple[str, Path, Path]]:
    """(stem, low, high) for each stem in both folders, sorted; unmatched files go to `on_problem`."""
    low = images_by_stem(low_dir, on_problem, ignored)
    high = images_by_stem(high_dir, on_problem, ignored)
    for stem in sorted(low.keys() - high.keys()):
        on_problem(
            SkippableInputError([low[stem]], f"{low[stem]} has no match with stem {stem!r} in {high_dir}")
        )
    for stem in sorted(high.keys() - low.keys()):
        on_problem(
            SkippableInputError([high[stem]], f"{high[stem]} has no match with stem {stem!r} in {low_dir}")
        )
    return [(stem, low[stem], high[stem]) for stem in sorted(low.keys() & high.keys())]


def collect_inputs(
    pairs: Iterable[tuple[Path, Path]] = (),
    unlabeled: Iterable[Path] = (),
    roots: Iterable[Path] = (),
    *,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    test_fold: tuple[int, int] | None = None,
    duplicate_distance: int = 6,
    hash_images: Callable[[list[Path]], list[int | None]] | None = None,
    labeled_fraction: float = 1.0,
    drop_unused_pairs: bool = False,
    labeled_lows_as_unlabeled: bool = False,
    seed: int = 0,
    skip_bad: bool = False,
) -> Inputs:
    """Every sample of the build, with its split and key, sorted by (split, subset, key).

    `--pairs` folders and `ROOT/labeled` are split into labeled/val/test by `split_pairs` when no root has a
    `val/` folder; `val_fraction`/`test_fraction` of None mean "0.1 / 0 when splitting, else 0".
    `test_fold` (index, count), 1-based, holds out fold `index` of `count` instead of `test_fraction`: the
    builds for index 1..count test every pair exactly once (cross-validation). In a drawn split, pairs whose
    low or high images are within `duplicate_distance` pHash bits of each other (LOL has two such scenes)
    share one split, so that nothing trains on a copy of an image it is scored on; `hash_images` hashes their
    images for that (default: one after another in this process).
    `labeled_fraction` < 1 keeps a seeded subset of the labeled pairs and moves the other pairs' low images
    to the unlabeled split (their ground truth is dropped), or with `drop_unused_pairs` leaves them out: a
    label-efficiency study on one paired set, with same-domain or other unlabeled data.
    `labeled_lows_as_unlabeled` also puts every labeled pair's low image in the unlabeled split: an unlabeled
    set from the labels' own camera when no other is at hand (all pairs labeled).
    """
    collector = _Collector(skip_bad)
    tags = _TagAllocator()
    labeled_pairs: list[tuple[str, str, Path, Path]] = []  # (tag, stem, low, high)
    fixed: list[tuple[str, str, str, Path, Path | None]] = []  # (split, tag, stem, low, high)
    has_val_split = False

    for low_dir, high_dir in pairs:
        tag = tags.new(Path(low_dir).resolve().parent.name or Path(low_dir).name)
        labeled_pairs += [(tag, s, lo, hi) for s, lo, hi in collector.pairs(Path(low_dir), Path(high_dir))]
    for folder in unlabeled:
        tag = tags.new(Path(folder).resolve().name)
        fixed += [("unlabeled", tag, s, p, None) for s, p in collector.list_images(Path(folder)).items()]
    for root in map(Path, roots):
        if not root.is_dir():
            raise UserError(f"--root {root} does not exist or is not a folder; check the path")
        tag = tags.new(root.resolve().name)
        known = {"labeled", "unlabeled", "val", "test"}
        if not any((root / name).is_dir() for name in known):
            raise UserError(
                f"--root {root} has none of labeled/, unlabeled/, val/, test/; "
                "see shards/README.md for the expected layout"
            )
        if (root / "labeled").is_dir():
            labeled_pairs += [
                (tag, s, lo, hi) for s, lo, hi in collector.pairs(root / "labeled/input", root / "labeled/GT")
            ]
        if (root / "unlabeled").is_dir():
            fixed += [
                ("unlabeled", tag, s, p, None)
                for s, p in collector.list_images(root / "unlabeled/input").items()
            ]
        if (root / "val").is_dir():
            has_val_split = True
            fixed += [
                ("val", tag, s, lo, hi) for s, lo, hi in collector.pairs(root / "val/input", root / "val/GT")
            ]
        for test_dir in sorted(p for p in (root / "test").glob("*") if p.is_dir()):
            test_tag = tags.new(test_dir.name)
            if (test_dir / "GT").is_dir():
                found = collector.pairs(test_dir / "input", test_dir / "GT")
                fixed += [("test", test_tag, s, lo, hi) for s, lo, hi in found]
            else:
                fixed += [
                    ("test", test_tag, s, p, None)
                    for s, p in collector.list_images(test_dir / "input").items()
                ]

    if has_val_split and (val_fraction or test_fraction or test_fold):
        raise UserError(
            "--val-fraction/--test-fraction/--test-fold split the labeled pairs, but a --root already has a "
            "val/ split; drop them or the val/ folder"
        )
    val_fraction = 0.0 if has_val_split else (0.1 if val_fraction is None else val_fraction)
    test_fraction = test_fraction or 0.0
    draws_held_out = bool(val_fraction or test_fraction or test_fold)
    split_of = split_pairs(
        sorted((tag, stem) for tag, stem, _, _ in labeled_pairs),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        test_fold=test_fold,
        seed=seed,
        groups=(
            near_duplicate_groups(labeled_pairs, duplicate_distance, hash_images or _hash_each)
            if draws_held_out
            else None
        ),
    )
    unlabeled_now = pairs_without_labels(
        sorted(key for key, split in split_of.items() if split == "labeled"), labeled_fraction, seed
    )
    for tag, stem, low, high in labeled_pairs:
        if (tag, stem) in unlabeled_now:
            if not drop_unused_pairs:
                fixed.append(("unlabeled", tag, stem, low, None))
        else:
            fixed.append((split_of[(tag, stem)], tag, stem, low, high))
            if labeled_lows_as_unlabeled and split_of[(tag, stem)] == "labeled":
                fixed.append(("unlabeled", tag, stem, low, None))

    samples = [
        Sample(sample_key(split, tag, stem), split, tag, low, high) for split, tag, stem, low, high in fixed
    ]
    _check_unique_keys(samples)
    collector.inputs.samples = sorted(samples, key=lambda s: (SPLITS.index(s.split), s.subset, s.key))
    if not collector.inputs.samples:
        raise UserError("no samples to build; pass --pairs, --unlabeled or --root with images")
    return collector.inputs


def split_pairs(
    items: list[tuple[str, str]],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    test_fold: tuple[int, int] | None = None,
    groups: dict[tuple[str, str], int] | None = None,
) -> dict[tuple[str, str], str]:
    """Seeded split of sorted (tag, stem) items into labeled/val/test; independent of listing order.

    One seeded permutation orders the items. With `test_fraction` its first `val_fraction` go to val and the
    next `test_fraction` to test. With `test_fold` = (index, count) the permutation is cut into `count`
    near-equal folds, fold `index` (1-based) is test, and val is the first `val_fraction` × all items of the
    order outside that fold (so builds 2..count share their val items): over index 1..count every item is
    tested once, and each build's val and labeled items come from the other folds. Items of one of `groups`
    (item -> group id) all take the split of the group's first item in the order; a split that grouping
    leaves empty is an error.
    """
    for name, fraction in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {fraction}")
    if test_fold is not None and test_fraction > 0:
        raise UserError("--test-fold holds out its own test pairs; drop --test-fraction")
    if val_fraction + test_fraction >= 1.0:
        raise UserError("--val-fraction + --test-fraction must leave some pairs for training (sum < 1)")
    order = np.random.default_rng(seed).permutation(len(items))
    # A positive fraction gets at least one pair, so "--val-fraction 0.1" on 5 pairs still validates.
    n_val = max(round(len(items) * val_fraction), 1 if val_fraction > 0 else 0)
    if test_fold is None:
        n_test = max(round(len(items) * test_fraction), 1 if test_fraction > 0 else 0)
        test, rest = order[n_val : n_val + n_test], np.concatenate([order[:n_val], order[n_val + n_test :]])
    else:
        index, count = test_fold
        if not 1 <= index <= count or count < 2 or count > len(items):
            raise UserError(
                f"--test-fold {index}/{count}: need 1 <= I <= N and 2 <= N <= the {len(items)} labeled pairs"
            )
        folds = np.array_split(order, count)
        test, rest = folds[index - 1], np.concatenate(folds[: index - 1] + folds[index:])
    if items and n_val + len(test) >= len(items):
        raise UserError(
            f"{len(items)} labeled pairs are too few for --val-fraction {val_fraction} and "
            f"{len(test)} test pairs; lower the fractions or add pairs"
        )
    split_of = {items[index]: "test" for index in test}
    for rank, index in enumerate(rest):
        split_of[items[index]] = "val" if rank < n_val else "labeled"
    if groups:
        first_of_group: dict[int, str] = {}
        for index in order:
            if items[index] in groups:
                group = groups[items[index]]
                split_of[items[index]] = first_of_group.setdefault(group, split_of[items[index]])
        wanted = {"labeled", "test"} if len(test) else {"labeled"}
        emptied = sorted((wanted | ({"val"} if n_val else set())) - set(split_of.values()))
        if emptied:
            raise UserError(
                f"near-duplicate pairs share one split, and their groups leave {' and '.join(emptied)} empty "
                f"(the largest group holds {max(Counter(groups.values()).values())} of {len(items)} pairs); "
                "lower --overlap-distance, remove the duplicates or change --seed"
            )
    return split_of


def near_duplicate_groups(
    pairs: list[tuple[str, str, Path, Path]],
    max_distance: int,
    hash_images: Callable[[list[Path]], list[int | None]],
) -> dict[tuple[str, str], int]:
    """(tag, stem) -> group id for the pairs with a low or high image within `max_distance` pHash bits of
    another pair's; pairs without a near duplicate are left out. Groups are closed under chaining.

    `hash_images` maps image paths to their pHash, None for an unreadable one (left to the encoder to report).
    """
    if not pairs:
        return {}
    hashes = hash_images(
        [path for _, _, low, high in pairs for path in (low, high)]
    )  # low, high of each pair
    readable = [i for i, h in enumerate(hashes) if h is not None]
    known = [hashes[i] for i in readable]
    parent = list(range(len(pairs)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in zip(*close_hashes(known, known, max_distance), strict=True):
        i, j = readable[a] // 2, readable[b] // 2  # image index -> pair index
        if i != j:
            parent[root(j)] = root(i)
    members: dict[int, list[int]] = {}
    for i in range(len(pairs)):
        members.setdefault(root(i), []).append(i)
    return {
        (pairs[i][0], pairs[i][1]): group for group, found in members.items() if len(found) > 1 for i in found
    }


def _hash_each(paths: list[Path]) -> list[int | None]:
    return [hash_or_none(path) for path in paths]


def hash_or_none(path: Path) -> int | None:
    """The image's pHash, or None when it cannot be read: the build reports (or skips) it when encoding."""
    try:
        return perceptual_hash(load_rgb8(path))
    except BadImageError:
        return None


def pairs_without_labels(
    labeled: list[tuple[str, str]], labeled_fraction: float, seed: int
) -> set[tuple[str, str]]:
    """The sorted labeled (tag, stem) items that lose their label: all but a seeded `labeled_fraction`.

    Drawn after, and independently of, the val/test split, so every fraction shares the same val and test
    pairs; a smaller fraction's labeled pairs are a subset of a larger one's (same seed).
    """
    if not 0.0 < labeled_fraction <= 1.0:
        raise UserError(f"--labeled-fraction must be in (0, 1], got {labeled_fraction}")
    keep = max(round(len(labeled) * labeled_fraction), 1) if labeled else 0
    order = np.random.default_rng([seed, 1]).permutation(len(labeled))
    return {labeled[index] for index in order[keep:]}


def sample_key(split: str, tag: str, stem: str) -> str:
    """`<split>_<tag>_<stem>` with every run of characters outside [A-Za-z0-9_-] replaced by "-".

    WebDataset splits member names at the first dot, so keys must not contain dots (or slashes).
    """
    return "_".join(_UNSAFE_KEY_CHARS.sub("-", part).strip("-") or "x" for part in (split, tag, stem))


def _check_unique_keys(samples: list[Sample]) -> None:
    seen: dict[str, Sample] = {}
    for sample in samples:
        if sample.key in seen:
            raise UserError(
                f"{seen[sample.key].low} and {sample.low} both map to the sample key {sample.key!r}; "
                "rename one of them (keys keep only letters, digits, '-' and '_')"
            )
        seen[sample.key] = sample


class _TagAllocator:
    """Source tags (the middle part of keys), unique: a second folder called "low" becomes "low-2"."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def new(self, name: str) -> str:
        base = _UNSAFE_KEY_CHARS.sub("-", name).strip("-") or "source"
        tag, n = base, 1
        while tag in self._used:
            n += 1
            tag = f"{base}-{n}"
        self._used.add(tag)
        return tag
