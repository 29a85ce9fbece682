"""Streaming pipelines: shapes, aligned augmentation, rank/worker splitting, determinism, resume."""

from __future__ import annotations

import itertools
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
    assert {k: tuple(v.shape) for k, v in batch.items() if k != "key"} == {
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
            shards, batch_size=2, crop_size=32, seed=7, num_workers=num_workers, start_batch=start_batch
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
    with pytest.raises(UserError, match="fewer than world_size"):
        take(labeled_loader(shards, batch_size=1, crop_size=32, rank=6, world_size=7), 1)


def test_pipe_location_reads_manifest_and_shards(shards):
    location = f"pipe:cat {shards}/{{}}"
    manifest = Manifest.open(location)
    assert manifest.url(manifest.shards[0]) == f"pipe:cat {shards}/{manifest.shards[0].name}"
    assert len(keys_seen(eval_loader(location, "val"))) == manifest.num_samples("val")
