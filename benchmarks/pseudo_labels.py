"""Pseudo-label quality on unlabeled images whose ground truth is known, and whether the bank's
no-reference score ranks candidates the way PSNR does (issue #17, docs/results/label_efficiency.md).

    python benchmarks/pseudo_labels.py --checkpoint runs/study/semi_paper/children/000-... \\
        --shards shards/study/lol10_lolrest --high ../shared/datasets/lol_v1_train115/high \\
        --basicsr-sdist basicsr-1.4.2.tar.gz [--size 128] [--views 4] [--out pseudo_labels.json]

For every unlabeled sample of the shards whose stem has a ground truth in --high (with `shards build
--labeled-fraction`, the lows of the pairs that lost their label), at the training view (resized to
--size square, as the trainer's weak view):
  * PSNR against the ground truth of the teacher's pseudo-label teacher(weak), of the teacher averaged
    over the 8 symmetries of the view (a test-time-augmented pseudo-label), of the student's
    student(weak), and of the student's outputs on strong views (the paper's and the `lowlight` ones); for
    the two pseudo-labels also with their brightness matched to the ground truth's (GT-mean PSNR) and to
    the labeled ground truths' mean brightness (a label-free exposure, one number for all images), and
    scaled by one gain for all images that brings their average to that brightness (distribution
    alignment: it corrects the teacher's overall bias and keeps its per-image brightness);
  * whether the teacher's per-image brightness tracks the ground truth's (Pearson r of their mean grey
    levels over the images; the input's for comparison): if it does not, one brightness for all is the
    better guess;
  * whether the 8 symmetries' disagreement marks where their mean is wrong: per pixel, the spread of the 8
    outputs against the error of their mean (Spearman), and the mean's PSNR on the half of the pixels where
    the 8 agree most and on the half where they agree least (a confidence mask for the consistency loss
    pays only if the first is clearly higher);
  * for each no-reference metric available offline (PIQE; NIQE with the pristine-model parameters that
    ship in basicsr's sdist), how often it orders two candidates of the same image as PSNR does (pairwise
    agreement, 0.5 = chance) and the mean per-image Spearman correlation with PSNR. The bank keeps a new
    pseudo-label when the metric says it beats the stored one, so this is the bank's accuracy.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semi_llie.data.augment import dihedral, resize_square, strong_view, undo_dihedral  # noqa: E402
from semi_llie.data.images import load_rgb8  # noqa: E402
from semi_llie.inference.loading import load_enhancer  # noqa: E402
from semi_llie.metrics.full_reference import grey_mean, gt_mean_scaled, scaled_to_grey  # noqa: E402

NIQE_MEMBER = "basicsr/metrics/niqe_pris_params.npz"


def niqe_parameters(sdist: Path, folder: Path) -> Path:
    """Write the NIQE pristine model from basicsr's sdist as the .mat file pyiqa's NIQE reads."""
    import scipy.io

    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(NIQE_MEMBER))
        params = np.load(io.BytesIO(tar.extractfile(member).read()))
    path = folder / "niqe_modelparameters.mat"
    scipy.io.savemat(
        path, {"mu_prisparam": params["mu_pris_param"], "cov_prisparam": params["cov_pris_param"]}
    )
    return path


def no_reference_metrics(sdist: Path | None, folder: Path) -> dict:
    """name -> (pyiqa metric, lower is better)."""
    import pyiqa

    metrics = {"piqe": pyiqa.create_metric("piqe", device="cpu")}
    if sdist is not None:
        metrics["niqe"] = pyiqa.create_metric(
            "niqe", device="cpu", pretrained_model_path=str(niqe_parameters(sdist, folder))
        )
    return {name: (metric, metric.lower_better) for name, metric in metrics.items()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / torch.mean((a.double() - b.double()) ** 2)))


def spearman(x: list[float], y: list[float]) -> float:
    rank_x, rank_y = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rank_x, rank_y)[0, 1])


def agreement_split(views: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """views: 8×3×S×S outputs for the 8 symmetries (each undone), gt: 3×S×S, both in [0, 1].

    Per pixel, spread = the views' standard deviation and error = |their mean − gt|, both averaged over
    the channels. Returns the Spearman correlation of spread and error over the pixels, and the mean's PSNR
    on the half of the pixels with the smallest spread ("sure") and on the other half ("unsure").
    """
    mean = views.double().mean(0)
    spread = views.double().std(0).mean(0).flatten()
    squared_error = ((mean - gt.double()) ** 2).mean(0).flatten()
    by_spread = torch.argsort(spread)
    sure, unsure = by_spread[: by_spread.numel() // 2], by_spread[by_spread.numel() // 2 :]
    return {
        "spearman": spearman(spread.tolist(), squared_error.sqrt().tolist()),
        "psnr_sure": float(-10 * torch.log10(squared_error[sure].mean())),
        "psnr_unsure": float(-10 * torch.log10(squared_error[unsure].mean())),
    }


def one_gain_psnr(labels: list[torch.Tensor], gts: list[torch.Tensor], level: float) -> list[float]:
    """Per-image PSNR of 1×3×S×S labels all scaled by the one gain that makes their average grey level
    `level` (then clamped to [0, 1]), against their ground truths."""
    gain = level / float(torch.cat([grey_mean(label) for label in labels]).mean())
    return [psnr((label * gain).clamp(0, 1), gt) for label, gt in zip(labels, gts, strict=True)]


def read_uint8(path: Path) -> torch.Tensor:
    return torch.from_numpy(load_rgb8(path).copy()).permute(2, 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="training OUTPUT_DIR or step dir")
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--high", type=Path, required=True, help="ground-truth folder, matched by stem")
    parser.add_argument("--basicsr-sdist", type=Path, help="basicsr-*.tar.gz, for NIQE's parameters")
    parser.add_argument("--size", type=int, default=128, help="view size (NIQE needs at least 96)")
    parser.add_argument("--views", type=int, default=4, help="strong views per kind and image")
    parser.add_argument("--out", type=Path, default=Path("pseudo_labels.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    teacher = load_enhancer(args.checkpoint, which="teacher").eval()
    student = load_enhancer(args.checkpoint, which="student").eval()
    highs = {p.stem: p for p in args.high.iterdir()}
    records = json.loads((args.shards / "manifest.json").read_text())["samples"]
    sources = [Path(r["sources"]["low"]["path"]) for r in records if r["split"] == "unlabeled"]
    lows = [path for path in sources if path.stem in highs]
    # A label-free brightness for a pseudo-label: the labeled ground truths' mean grey level at the view size.
    labeled_highs = [Path(r["sources"]["high"]["path"]) for r in records if r["split"] == "labeled"]
    views = [resize_square(read_uint8(path), args.size) for path in labeled_highs]  # each 3×S×S
    labeled_brightness = float(grey_mean(torch.stack(views)).mean())
    if not lows:
        raise SystemExit(f"no unlabeled sample of {args.shards} has a ground truth in {args.high}")

    with tempfile.TemporaryDirectory() as folder:
        metrics = no_reference_metrics(args.basicsr_sdist, Path(folder))
        psnrs: dict[str, list[float]] = {}
        split: dict[str, list[float]] = {}  # agreement_split per image
        agreement = {name: [0, 0] for name in metrics}  # agreeing pairs, pairs
        correlations: dict[str, list[float]] = {name: [] for name in metrics}
        labels: dict[str, list[torch.Tensor]] = {}  # the two pseudo-labels per image, for one_gain_psnr
        grey: dict[str, list[float]] = {}  # mean grey level per image
        gts: list[torch.Tensor] = []
        for index, low_path in enumerate(lows):
            weak = resize_square(read_uint8(low_path), args.size)[None]  # 1×3×S×S
            gt = resize_square(read_uint8(highs[low_path.stem]), args.size)[None]
            gts.append(gt)
            generator = torch.Generator().manual_seed(index)
            candidates = {"input": weak}
            with torch.no_grad():
                candidates["teacher(weak)"] = teacher(weak)
                candidates["student(weak)"] = student(weak)
                # A candidate pseudo-label: the teacher averaged over the 8 symmetries of the view (TTA).
                symmetries = torch.cat([undo_dihedral(teacher(dihedral(weak, k)), k) for k in range(8)])
                candidates["teacher(weak, 8-fold TTA)"] = symmetries.mean(0, keepdim=True)
                for name, value in agreement_split(symmetries.clamp(0, 1), gt[0]).items():
                    split.setdefault(name, []).append(value)
                for kind, view in itertools.product(("paper", "lowlight"), range(args.views)):
                    strong = strong_view(weak[0], generator, kind)[None]
                    candidates[f"student(strong {kind})#{view}"] = student(strong)
            image_psnr = {name: psnr(out, gt) for name, out in candidates.items()}
            for name, value in image_psnr.items():  # the views of one kind pooled
                psnrs.setdefault(name.split("#")[0], []).append(value)
            for name in ("teacher(weak)", "teacher(weak, 8-fold TTA)"):  # how much of the error is brightness
                label = candidates[name].clamp(0, 1)
                matched = psnr(gt_mean_scaled(label, gt), gt)
                psnrs.setdefault(f"{name}, GT-mean", []).append(matched)
                prior = psnr(scaled_to_grey(label, labeled_brightness), gt)
                psnrs.setdefault(f"{name}, labeled mean", []).append(prior)
                labels.setdefault(name, []).append(label)
            for name, image in (("input", weak), ("teacher(weak)", candidates["teacher(weak)"]), ("gt", gt)):
                grey.setdefault(name, []).append(float(grey_mean(image.clamp(0, 1))))
            names = [n for n in candidates if n != "input"]
            for metric_name, (metric, lower_better) in metrics.items():
                with torch.no_grad():
                    scores = {n: float(metric(candidates[n].clamp(0, 1))) for n in names}
                sign = -1.0 if lower_better else 1.0
                for a, b in itertools.combinations(names, 2):
                    if image_psnr[a] == image_psnr[b]:
                        continue
                    agreement[metric_name][1] += 1
                    agrees = (sign * (scores[a] - scores[b]) > 0) == (image_psnr[a] > image_psnr[b])
                    agreement[metric_name][0] += int(agrees)
                correlations[metric_name].append(
                    spearman([sign * scores[n] for n in names], [image_psnr[n] for n in names])
                )

    for name, images in labels.items():
        psnrs[f"{name}, one gain to labeled mean"] = one_gain_psnr(images, gts, labeled_brightness)
    result = {
        "checkpoint": str(args.checkpoint),
        "images": len(lows),
        "size": args.size,
        "psnr_db": {name: [float(np.mean(v)), float(np.std(v))] for name, v in psnrs.items()},
        "labeled_brightness": labeled_brightness,
        "grey_mean": {name: float(np.mean(v)) for name, v in grey.items()},
        "grey_pearson_with_gt": {
            name: float(np.corrcoef(grey[name], grey["gt"])[0, 1]) for name in ("input", "teacher(weak)")
        },
        "tta_agreement": {name: [float(np.nanmean(v)), float(np.nanstd(v))] for name, v in split.items()},
        "no_reference": {
            name: {
                "pairwise_agreement_with_psnr": agreement[name][0] / max(agreement[name][1], 1),
                "pairs": agreement[name][1],
                "mean_spearman_with_psnr": float(np.nanmean(correlations[name])),
            }
            for name in metrics
        },
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(lows)} unlabeled images with ground truth, views of {args.size}")
    for name, (mean, std) in result["psnr_db"].items():
        print(f"  PSNR {name:38s} {mean:6.2f} ± {std:.2f} dB")
    print(
        f"  mean grey level: labeled targets {labeled_brightness:.3f}, "
        + ", ".join(f"{name} {value:.3f}" for name, value in result["grey_mean"].items())
    )
    print(
        "  per-image brightness against the ground truth's, Pearson r: "
        + ", ".join(f"{name} {value:+.2f}" for name, value in result["grey_pearson_with_gt"].items())
    )
    tta = {name: mean for name, (mean, _) in result["tta_agreement"].items()}
    print(
        f"  8-fold TTA: spread vs error Spearman {tta['spearman']:+.2f}; PSNR where the 8 agree most "
        f"{tta['psnr_sure']:.2f} dB, least {tta['psnr_unsure']:.2f} dB"
    )
    for name, values in result["no_reference"].items():
        print(
            f"  {name}: agrees with PSNR on {values['pairwise_agreement_with_psnr']:.1%} of "
            f"{values['pairs']} same-image pairs; mean Spearman {values['mean_spearman_with_psnr']:+.2f}"
        )


if __name__ == "__main__":
    main()
