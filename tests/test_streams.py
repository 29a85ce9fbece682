"""Streaming pipelines: shapes, aligned augmentation, rank/worker splitting, determinism, resume."""

from __future__ import annotations

import io
import itertools
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from shard_helpers import make_dataset

from semi_llie.data import Manifest, eval_loader, labeled_loader, streams, unlabeled_loader
from semi_llie.data.augment import dihedral, paired_crop, resize_square, strong_view
from semi_llie.data.build import BuildConfig, build_shards
from semi_llie.errors import UserError

torch.set_num_threads(1)
real_decode = streams.decode


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    data = make_dataset(tmp_path_factory.mktemp("data"), n_lol=4, n_synthetic=8, n_unlabeled=3)
    out = tmp_path_factory.mktemp("shards")
    build_shards(
        BuildConfig(
            out=out,
            pairs=((str(data["low"]), str(data["high"])),),
            unlabeled=(str(data["unlabeled"]),),
            val_fraction=0.5,
            max_count=1,
        )
    )
    return out


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(iter(loader), n))


def test_labeled_batches_have_contract_shapes_and_aligned_crops(shards):
    batch = take(labeled_loader(shards, batch_size=3, crop_size=32, seed=0), 1)[0]
    assert len(batch["key"]) == 3 and all(k.startswith("labeled_") for k in batch["key"])
    for name in ("low", "high", "illum"):
        assert batch[name].shape == (3, 3, 32, 32) and batch[name].dtype == torch.float32
    synthetic = [i for i, k in enumerate(batch["key"]) if "_syn" in k]
    for i in synthetic:  # synthetic pairs have high = 255 - low: only an identical crop keeps that
        torch.testing.assert_close(batch["high"][i], 1.0 - batch["low"][i])


def test_cached_decoding_gives_the_same_batches_and_decodes_each_pair_once(shards, monkeypatch):
    def batches(**kwargs):
        return take(labeled_loader(shards, batch_size=2, crop_size=16, seed=3, **kwargs), 9)

    plain = batches()
    decoded = []
    monkeypatch.setattr(streams, "decode", lambda data: decoded.append(data) or real_decode(data))
    cached = batches(cache_decoded=True)
    for a, b in zip(plain, cached, strict=True):  # 9 batches of 2 = 3 epochs of the 6 labeled pairs
        assert a["key"] == b["key"] and all(torch.equal(a[n], b[n]) for n in ("low", "high", "illum"))
    assert len(decoded) == 6 * 3  # low, high and illum of each pair, decoded in the first epoch only


def test_exposure_augment_rescales_only_the_low_crop_in_linear_light(shards):
    def batches(**kwargs):
        return take(labeled_loader(shards, batch_size=3, crop_size=32, seed=5, **kwargs), 4)

    factors = []
    for plain, jittered in zip(batches(), batches(augment="exposure"), strict=True):
        assert plain["key"] == jittered["key"]  # same samples, same crops: the draw comes after the crop
        assert torch.equal(plain["high"], jittered["high"]) and torch.equal(plain["illum"], jittered["illum"])
        for before, after in zip(plain["low"].double(), jittered["low"].double(), strict=True):
            # one gain for the whole crop in linear light (x ** 2.2), wherever neither side is clipped (at
            # 1) or so dark that float32 rounding dominates the ratio
            usable = (before > 0.01) & (after < 0.99)
            ratio = after[usable] ** 2.2 / before[usable] ** 2.2
            assert usable.sum() > 100 and ratio.std() / ratio.mean() < 1e-4
            factors.append(ratio.mean().item())
    assert 0.5 <= min(factors) and max(factors) <= 1.5 and max(factors) - min(factors) > 0.3


def test_images_smaller_than_the_crop_are_padded(shards):
    batch = take(labeled_loader(shards, batch_size=2, crop_size=80, seed=0), 1)[0]  # images are 64×96
    assert batch["low"].shape == (2, 3, 80, 80)


def test_paired_crop_uses_all_eight_dihedral_transforms():
    image = torch.arange(16, dtype=torch.uint8).reshape(1, 4, 4)
    assert len({tuple(dihedral(image, i).flatten().tolist()) for i in range(8)}) == 8
    seen = set()
    for seed in range(64):
        crop = paired_crop({"a": image, "b": image * 2}, 4, torch.Generator().manual_seed(seed))
        assert torch.equal(crop["b"], crop["a"] * 2)
        seen.add(tuple(crop["a"].flatten().tolist()))
    assert len(seen) == 8


def test_unlabeled_views(shards):
    batch = take(unlabeled_loader(shards, batch_size=3, unlabeled_size=40, seed=0), 1)[0]
    assert {k: tuple(v.shape) for k, v in batch.items() if k not in ("key", "skipped")} == {
        "index": (3,),
        "weak": (3, 3, 40, 40),
        "strong": (3, 3, 40, 40),
        "illum": (3, 3, 40, 40),
    }
    assert all(k.startswith("unlabeled_") for k in batch["key"])
    weak = resize_square(torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8), 24)
    first = strong_view(weak, torch.Generator().manual_seed(3))
    assert torch.equal(first, strong_view(weak, torch.Generator().manual_seed(3)))
    views = [strong_view(weak, torch.Generator().manual_seed(s)) for s in range(8)]
    assert sum(not torch.equal(v, weak) for v in views) >= 6  # augmentation fires (p=0.8 jitter alone)


def test_lowlight_strong_view_changes_exposure_and_noise_but_never_colour():
    # A dim reddish image: the paper's view turns some grey or shifts hue; the lowlight view keeps the
    # image's colour balance up to noise (its changes are a gain in linear light, zero-mean noise, blur).
    weak = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.05
    weak[0] *= 1.6

    def colour(image):  # the share of each channel in the image's total
        means = image.mean(dim=(1, 2))
        return means / means.sum()

    chroma = colour(weak)
    gains, chroma_errors = [], []
    for seed in range(16):
        view = strong_view(weak, torch.Generator().manual_seed(seed), "lowlight")
        assert view.shape == weak.shape and 0 <= view.min() and view.max() <= 1
        linear_ratio = (view.clamp_min(1e-3) ** 2.2).mean() / (weak**2.2).mean()
        gains.append(linear_ratio.item())
        chroma_errors.append((colour(view) - chroma).abs().max().item())
    assert min(gains) < 0.8 and max(gains) > 1.2  # exposure drawn from U(0.5, 1.5)
    assert max(chroma_errors) < 0.02
    paper = [strong_view(weak, torch.Generator().manual_seed(s), "paper") for s in range(16)]
    assert max((colour(v) - chroma).abs().max().item() for v in paper) > 0.05


def keys_seen(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


@pytest.mark.parametrize("max_count", [1, 100])  # many shards (shard split) and one shard (sample stride)
def test_eval_two_ranks_two_workers_see_each_sample_once(shards, tmp_path, max_count):
    location = shards
    if max_count == 100:
        manifest = Manifest.open(shards)
        data_low = Path(manifest.data["samples"][0]["sources"]["low"]["path"]).parent
        location = tmp_path
        build_shards(
            BuildConfig(
                out=tmp_path,
                pairs=((str(data_low), str(data_low.parent / "high")),),
                val_fraction=0.5,
                max_count=100,
            )
        )
    manifest = Manifest.open(location)
    expected = sorted(r["key"] for r in manifest.data["samples"] if r["split"] == "val")
    per_rank = [keys_seen(eval_loader(location, "val", rank=r, world_size=2, num_workers=2)) for r in (0, 1)]
    assert sorted(per_rank[0] + per_rank[1]) == expected
    assert per_rank[0] and per_rank[1]
    batch = next(iter(eval_loader(location, "val")))
    assert batch["low"].shape == (1, 3, 64, 96) and batch["high"].shape == batch["illum"].shape


def test_training_streams_are_deterministic_and_differ_between_ranks(shards):
    def run(**kwargs):
        return take(labeled_loader(shards, batch_size=2, crop_size=32, **kwargs), 4)

    one, again = run(seed=1, rank=0, world_size=2), run(seed=1, rank=0, world_size=2)
    assert [b["key"] for b in one] == [b["key"] for b in again]
    assert all(torch.equal(a["low"], b["low"]) for a, b in zip(one, again, strict=True))
    other_rank = run(seed=1, rank=1, world_size=2)
    assert not set(one[0]["key"]) & set(other_rank[0]["key"])  # disjoint shards in an epoch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_stream_equals_the_uninterrupted_one(shards, num_workers):
    # 6 labeled samples, batch 2: 9 batches cross epoch boundaries, so whole-epoch skipping is exercised.
    def loader(start_batch):
        return labeled_loader(
            shards,
            batch_size=2,
            crop_size=32,
            seed=7,
            num_workers=num_workers,
            start_batch=start_batch,
            augment="exposure",  # a random draw per sample after the crop: must replay on resume too
        )

    full = take(loader(0), 9)
    resumed = take(loader(5), 4)
    assert [b["key"] for b in resumed] == [b["key"] for b in full[5:]]
    for a, b in zip(resumed, full[5:], strict=True):
        assert all(torch.equal(a[name], b[name]) for name in ("low", "high", "illum"))
    unlabeled_full = take(unlabeled_loader(shards, 2, 16, seed=7, num_workers=num_workers), 4)
    unlabeled_resumed = take(
        unlabeled_loader(shards, 2, 16, seed=7, num_workers=num_workers, start_batch=3), 1
    )
    assert torch.equal(unlabeled_resumed[0]["strong"], unlabeled_full[3]["strong"])


def test_too_few_samples_for_the_readers_is_a_clear_error(shards):
    with pytest.raises(UserError, match="too few for world_size"):
        take(labeled_loader(shards, batch_size=1, crop_size=32, rank=6, world_size=7), 1)


def test_pipe_location_reads_manifest_and_shards(shards):
    location = f"pipe:cat {shards}/{{}}"
    manifest = Manifest.open(location)
    assert manifest.url(manifest.shards[0]) == f"pipe:cat {shards}/{manifest.shards[0].name}"
    assert len(keys_seen(eval_loader(location, "val"))) == manifest.num_samples("val")


# -- ownership: a rank streams the same samples in every epoch ------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [2, 3, 8])  # 3 unlabeled shards: shard split (2, 3) and stride (8)
def test_each_sample_has_one_owner_rank_in_every_epoch(shards, world_size, num_workers):
    manifest = Manifest.open(shards)
    records = [r for r in manifest.data["samples"] if r["split"] == "unlabeled"]
    assert len(manifest.shards_of("unlabeled")) == 3
    streamed: dict[str, set[int]] = {}
    for rank in range(world_size):
        if world_size == 8 and rank >= len(records):
            continue  # 3 samples: ranks 3..7 own nothing
        loader = unlabeled_loader(
            shards,
            1,
            16,
            seed=5,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers if (world_size, rank) == (2, 0) else 0,
        )
        for batch in take(loader, 3 * len(records)):  # several epochs of any rank's share
            owner = streams.owner_ranks(manifest.shards_of("unlabeled"), world_size, batch["index"])
            assert owner.tolist() == [rank]
            streamed.setdefault(batch["key"][0], set()).add(rank)
    # Every sample is streamed, each by exactly one rank; its split index is its manifest position.
    assert sorted(streamed) == sorted(r["key"] for r in records)
    assert all(len(ranks) == 1 for ranks in streamed.values())
    by_index = [r["key"] for r in records]  # manifest order == split index order
    ranks_by_index = [next(iter(streamed[key])) for key in by_index]
    expected = streams.owner_ranks(manifest.shards_of("unlabeled"), world_size, torch.arange(len(by_index)))
    assert ranks_by_index == expected.tolist()


def test_owner_ranks_by_shard_and_by_stride():
    entries = [
        streams.ShardEntry(f"u-{i}", "unlabeled", "", samples=n, bytes=0, sha256="", has_high=False)
        for i, n in enumerate([3, 2, 4])
    ]
    # 3 shards, 2 ranks: shards 0 and 2 -> rank 0, shard 1 -> rank 1 (indices 0-2 | 3-4 | 5-8)
    assert streams.owner_ranks(entries, 2, torch.arange(9)).tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0]
    # 4 ranks > 3 shards: sample index mod 4
    assert streams.owner_ranks(entries, 4, torch.arange(9)).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0]


# -- damaged shards met mid-stream ------------------------------------------------------------------------


def damaged_copy(shards: Path, out: Path, damage) -> tuple[Path, str]:
    """A copy of `shards` whose first unlabeled shard is passed to `damage(path)`; returns (copy, shard)."""
    shutil.copytree(shards, out)
    name = Manifest.open(out).shards_of("unlabeled")[0].name
    damage(out / name)
    return out, name


def corrupt_first_png(path: Path) -> None:
    with tarfile.open(path) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(path, "w") as archive:
        for member, data in members:
            if member.name.endswith("low.png"):
                data = b"not a png" * 10
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))


def test_an_undecodable_sample_is_named_or_skipped_and_counted(shards, tmp_path):
    broken, shard = damaged_copy(shards, tmp_path / "broken", corrupt_first_png)
    key = Manifest.open(broken).data["samples"]
    bad_key = next(r["key"] for r in key if r["split"] == "unlabeled")  # the first shard holds one sample
    with pytest.raises(UserError, match=rf"sample '{bad_key}' of shard .*{shard}.*skip_bad_samples"):
        take(unlabeled_loader(broken, 1, 16, seed=2), 4)

    batches = take(unlabeled_loader(broken, 1, 16, seed=2, skip_bad=True), 6)  # 3 epochs of 2 good samples
    reported = [name for b in batches for name in b["skipped"]]
    assert reported and set(reported) == {f"{shard}/{bad_key}"}
    assert bad_key not in {k for b in batches for k in b["key"]}
    # Resuming with the reported names continues exactly where the uninterrupted stream was.
    resumed = take(
        unlabeled_loader(broken, 1, 16, seed=2, skip_bad=True, start_batch=3, known_bad=frozenset(reported)),
        3,
    )
    assert [b["key"] for b in resumed] == [b["key"] for b in batches[3:]]
    assert all(torch.equal(a["strong"], b["strong"]) for a, b in zip(resumed, batches[3:], strict=True))


def test_a_truncated_shard_is_named_or_skipped(shards, tmp_path):
    def truncate(path: Path) -> None:
        path.write_bytes(path.read_bytes()[:700])  # inside the first member

    broken, shard = damaged_copy(shards, tmp_path / "truncated", truncate)
    with pytest.raises(UserError, match=rf"shard .*{shard}.*truncated"):
        take(unlabeled_loader(broken, 1, 16, seed=2), 4)
    batches = take(unlabeled_loader(broken, 1, 16, seed=2, skip_bad=True), 4)
    assert {name for b in batches for name in b["skipped"]} == {f"{shard}/*"}
