"""Training-loader throughput at `configs/lol_v1.yaml` settings, per worker, and the workers one GPU needs.

One DataLoader worker is one process running the stream's decode + augment loop on one thread, so the
in-process stream (num_workers=0, torch on one thread) measures one worker's rate. A training step of one
GPU consumes `batch_size_labeled` labeled crops and `batch_size_unlabeled` unlabeled views (weak + strong
+ illumination). The labeled and the unlabeled loader each start `data.num_workers` workers, so each
loader needs ceil(B / (rate · step_seconds)) workers to never make the step wait, and `num_workers` is
the larger of the two (a GPU then runs 2 × num_workers loader processes). Also profiles where a sample's
time goes: decoding the PNG members, cropping / resizing, the strong augmentation.

    python benchmarks/loader.py [--config configs/lol_v1.yaml] [--step-seconds 0.15] [--samples 48]

The shards are built from ../shared/datasets (LOL pairs + unpaired photos) into a temporary folder.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from semi_llie.config import load_config
from semi_llie.data import BuildConfig, build_shards, labeled_loader, unlabeled_loader
from semi_llie.data.augment import paired_crop, resize_square, strong_view
from semi_llie.data.manifest import Manifest
from semi_llie.data.streams import decode

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def rate(batches, batch_size: int, samples: int) -> float:
    """Samples/s over `samples` after one warm-up batch."""
    next(batches)
    started = time.perf_counter()
    count = sum(len(b["key"]) for b in itertools.islice(batches, max(1, samples // batch_size)))
    return count / (time.perf_counter() - started)


def profile(shards: Path, crop: int, size: int, strong: str, count: int = 16) -> dict[str, float]:
    """Milliseconds per sample of each stage, on the first `count` samples of each split."""
    import tarfile

    manifest = Manifest.open(str(shards))
    raws: dict[str, list[dict[str, bytes]]] = {"labeled": [], "unlabeled": []}
    for split in raws:
        for entry in manifest.shards_of(split):
            with tarfile.open(shards / entry.name) as tar:
                members: dict[str, dict[str, bytes]] = {}
                for member in tar.getmembers():
                    key, suffix = member.name.split(".", 1)
                    members.setdefault(key, {})[suffix] = tar.extractfile(member).read()
            raws[split] += list(members.values())
            if len(raws[split]) >= count:
                break
        raws[split] = raws[split][:count]
    generator = torch.Generator().manual_seed(0)
    stages: dict[str, float] = {}

    def timed(name: str, fn, items):
        started = time.perf_counter()
        results = [fn(item) for item in items]
        stages[name] = (time.perf_counter() - started) / len(items) * 1000
        return results

    decoded = timed(
        "labeled: decode low+high+illum PNG",
        lambda raw: {n: decode(raw[f"{n}.png"]) for n in ("low", "high", "illum")},
        raws["labeled"],
    )
    crops = timed("labeled: crop + dihedral (uint8)", lambda d: paired_crop(d, crop, generator), decoded)
    timed("labeled: to float", lambda c: {n: t.float() / 255.0 for n, t in c.items()}, crops)
    lows = timed(
        "unlabeled: decode low+illum PNG",
        lambda raw: (decode(raw["low.png"]), decode(raw["illum.png"])),
        raws["unlabeled"],
    )
    weak = timed(
        "unlabeled: resize both to S", lambda p: (resize_square(p[0], size), resize_square(p[1], size)), lows
    )
    timed(f"unlabeled: strong view ({strong})", lambda w: strong_view(w[0], generator, strong), weak)
    return {name: round(ms, 2) for name, ms in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/lol_v1.yaml"))
    parser.add_argument(
        "--step-seconds", type=float, default=0.15, help="GPU step time to feed (default: assumed)"
    )
    parser.add_argument("--samples", type=int, default=48, help="samples per measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    data = load_config(args.config).data

    with tempfile.TemporaryDirectory() as temporary:
        shards = Path(temporary) / "shards"
        lol = SHARED / "lol_v1_train115"
        build_shards(
            BuildConfig(
                out=shards,
                pairs=((str(lol / "low"), str(lol / "high")),),
                unlabeled=(str(SHARED / "unpaired"),),
                val_fraction=0.0,
                max_count=16,
                allow_overlap=True,
            )
        )
        common = dict(seed=0, num_workers=0)
        labeled = iter(labeled_loader(shards, data.batch_size_labeled, data.crop_size, **common))
        unlabeled = iter(
            unlabeled_loader(
                shards,
                data.batch_size_unlabeled,
                data.unlabeled_size,
                strong_augment=data.strong_augment,
                **common,
            )
        )
        labeled_rate = rate(labeled, data.batch_size_labeled, args.samples)
        unlabeled_rate = rate(unlabeled, data.batch_size_unlabeled, args.samples)
        stages = profile(shards, data.crop_size, data.unlabeled_size, data.strong_augment)
    needed = {
        "labeled": math.ceil(data.batch_size_labeled / (labeled_rate * args.step_seconds)),
        "unlabeled": math.ceil(data.batch_size_unlabeled / (unlabeled_rate * args.step_seconds)),
    }
    result = {
        "config": str(args.config),
        "per_worker_samples_per_s": {
            "labeled": round(labeled_rate, 1),
            "unlabeled": round(unlabeled_rate, 1),
        },
        "step_seconds": args.step_seconds,
        "workers_needed_per_loader": needed,
        "num_workers": max(needed.values()),
        "config_num_workers": data.num_workers,
        "ms_per_sample_by_stage": stages,
    }
    print(json.dumps(result, indent=1))
    print(
        f"one worker: {labeled_rate:.1f} labeled / {unlabeled_rate:.1f} unlabeled samples/s; "
        f"a {args.step_seconds} s step of {data.batch_size_labeled}+{data.batch_size_unlabeled} needs "
        f"{needed['labeled']} + {needed['unlabeled']} workers: num_workers {max(needed.values())} "
        f"(config: {data.num_workers})"
    )


if __name__ == "__main__":
    main()
