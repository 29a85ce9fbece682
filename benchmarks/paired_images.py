"""Two sweep arms compared image by image: is a difference in mean PSNR the arm's, or the images'?

`semi-llie runs compare` reports each arm's mean ± std over seeds, which says how much the seed moves a score
but not how much the choice of held-out images does. This script pairs the arms on the same images: per image,
the metric averaged over the seeds both arms ran, then A - B; it prints the mean difference with a 95 %
bootstrap interval over images, its spread and on how many images A wins. A difference made of a few large
per-image swings (a brightness bet) has a wide interval on 10 or 23 images; a small gain on every image
has a narrow one.

Reads `DIR/children/*/eval-SPLIT/per_image.csv` and `sweep_done.json` (seed) of each arm; `sweep
--evaluate-split test` writes eval-test, and `semi-llie evaluate --data SHARDS --split val --checkpoint CHILD
--out CHILD/eval-val` adds val. Children of one seed that scored different images are joined: a sweep with
`--grid data.shards=` over the cross-validation folds (`shards build --test-fold I/K`) scores every image
once per seed on test (not on val: the folds share val pairs). A seed that did not score every image in both
arms (a sweep still running) is left out.

    python benchmarks/paired_images.py --a runs/few/rule_25 --b runs/few/file_25 --split val --metric psnr
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def per_image_scores(arm: Path, split: str, metric: str) -> dict[int, dict[str, float]]:
    """{seed: {image key: metric}} over the arm's children that were scored on `split`, folds joined."""
    scores: dict[int, dict[str, float]] = {}
    for child in sorted((arm / "children").iterdir()):
        table = child / f"eval-{split}" / "per_image.csv"
        if not table.is_file():
            continue
        seed = json.loads((child / "sweep_done.json").read_text())["seed"]
        with table.open(newline="") as f:
            found = {row["key"]: float(row[metric]) for row in csv.DictReader(f)}
        twice = found.keys() & scores.get(seed, {}).keys()
        if twice:
            raise ValueError(
                f"{arm.name}: {len(twice)} image(s) scored by two children of seed {seed} (e.g. "
                f"{min(twice)}); only children of one seed that score different images are joined: the "
                "test splits of --test-fold folds are, their val splits share pairs"
            )
        scores.setdefault(seed, {}).update(found)
    return scores


@dataclass(frozen=True)
class PairedDifference:
    seeds: list[int]  # the seeds both arms ran on every image
    differences: np.ndarray  # (images,) A - B per image, each averaged over `seeds`
    low: float  # 95 % bootstrap interval of the mean difference
    high: float

    @property
    def mean(self) -> float:
        return float(self.differences.mean())

    @property
    def wins(self) -> int:
        return int((self.differences > 0).sum())


def paired_difference(
    a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], resamples: int = 10_000, seed: int = 0
) -> PairedDifference:
    """A - B per image over the seeds both ran on every image, with the percentile bootstrap of its mean."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two arms have no seed in common on this split")
    keys = sorted(set().union(*(scores[s] for scores in (a, b) for s in common)))
    seeds = [s for s in common if sorted(a[s]) == sorted(b[s]) == keys]
    if not seeds:
        raise ValueError("the arms were scored on different images: no seed scored every image in both")
    differences = np.array([np.mean([a[s][k] - b[s][k] for s in seeds]) for k in keys])
    rng = np.random.default_rng(seed)
    means = differences[rng.integers(0, len(keys), (resamples, len(keys)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedDifference(seeds, differences, float(low), float(high))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="sweep folder of arm A")
    parser.add_argument("--b", type=Path, required=True, help="sweep folder of arm B")
    parser.add_argument("--split", default="test", help="eval-SPLIT folders to read (default test)")
    parser.add_argument(
        "--metric", default="psnr", help="a per_image.csv column (psnr, psnr_gtmean, ssim, ...)"
    )
    args = parser.parse_args()
    result = paired_difference(*(per_image_scores(arm, args.split, args.metric) for arm in (args.a, args.b)))
    print(
        f"{args.a.name} - {args.b.name}, {args.split} {args.metric}: {result.mean:+.2f} "
        f"[{result.low:+.2f}, {result.high:+.2f}] (95 % over images), per-image sd "
        f"{result.differences.std(ddof=1):.2f}, A ahead on {result.wins}/{len(result.differences)} images, "
        f"seeds {result.seeds}"
    )


if __name__ == "__main__":
    main()
