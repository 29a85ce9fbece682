"""CPU inference of the paper model: this tree against an earlier commit, in one run, on the same weights.

    python benchmarks/cpu_inference.py --baseline 08eabd0            # 600×400, 2 threads, 2 rounds
    python benchmarks/cpu_inference.py --baseline 08eabd0 --rounds 3 --size 400x600

The baseline is the `semi_llie` package of `--baseline`, exported with `git archive` into a temporary
folder. Its C++ kernel builds into its own extension cache, ~/.cache/semi_llie/bench_extensions/REV, so the
two kernels never rebuild each other's and a second run starts at once.
Both load one seeded state dict and one input (the first LOL low image when ../shared is beside the repo,
else a seeded random image). Each round runs the baseline and this tree in fresh processes, alternately,
so a change in the machine's load hits both; a process warms up with one forward, then times one. Prints
the median seconds of each, the ratio, and the largest difference between the two outputs (a speed-up
must leave the outputs unchanged: the script fails above --tolerance).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_CACHE = Path.home() / ".cache" / "semi_llie" / "bench_extensions"
LOL_LOW = ROOT.parent / "shared" / "datasets" / "lol_v1_train115" / "low"


def child(state_path: str, input_path: str, output_path: str, threads: int) -> None:
    """In a fresh process whose `semi_llie` is the tree under test: warm up, time one forward, save it."""
    import torch

    from semi_llie.models import MambaLowlight

    torch.set_num_threads(threads)
    model = MambaLowlight().eval()
    model.load_state_dict(torch.load(state_path))
    x = torch.load(input_path)
    with torch.no_grad():
        model(x)  # allocator and oneDNN kernel selection, the kernel's first load
        start = time.perf_counter()
        y = model(x)[0]
        seconds = time.perf_counter() - start
    torch.save(y, output_path)
    import semi_llie

    print(json.dumps({"seconds": seconds, "package": str(Path(semi_llie.__file__).parent)}))


def fixed_input(height: int, width: int):
    """(1, 3, H, W) in [0, 1]: the first LOL low image resized, or seeded noise without ../shared."""
    import torch
    import torch.nn.functional as F

    images = sorted(LOL_LOW.glob("*.png")) if LOL_LOW.is_dir() else []
    if not images:
        return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    from semi_llie.data.images import load_rgb8

    image = torch.from_numpy(load_rgb8(images[0])).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def export(revision: str, folder: Path) -> Path:
    """Write the `semi_llie` package at `revision` under `folder`; returns the folder (for PYTHONPATH)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "semi_llie"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def run_child(source: Path, cache: Path | None, files: dict[str, Path], output: Path, threads: int) -> float:
    """Seconds of one forward of the tree under `source` in a fresh process (`cache`: its extension cache,
    None for torch's default)."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        env["TORCH_EXTENSIONS_DIR"] = str(cache)
    command = [
        sys.executable,
        __file__,
        "--child",
        str(files["state"]),
        str(files["input"]),
        str(output),
        "--threads",
        str(threads),
    ]
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=source)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if Path(report["package"]).resolve() != (source / "semi_llie").resolve():
        raise RuntimeError(f"the child imported {report['package']}, not the tree under {source}")
    return report["seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=False, help="git revision to compare against")
    parser.add_argument("--size", default="400x600", help="HxW of the input")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest output difference allowed")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, threads=args.threads)
        return 0
    if not args.baseline:
        parser.error("--baseline REV is required")

    import torch

    from semi_llie.models import MambaLowlight

    height, width = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="cpu_inference_") as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        files = {"state": work / "state.pt", "input": work / "input.pt"}
        torch.save(MambaLowlight().state_dict(), files["state"])
        torch.save(fixed_input(height, width), files["input"])
        (work / "baseline").mkdir()
        trees = {
            f"baseline {args.baseline}": (
                export(args.baseline, work / "baseline"),
                BENCH_CACHE / args.baseline,
            ),
            "this tree": (ROOT, None),
        }
        print(
            f"MambaLowlight paper config, {height}×{width}, {args.threads} threads, {args.rounds} rounds; "
            f"load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        seconds: dict[str, list[float]] = {name: [] for name in trees}
        for round_ in range(args.rounds):
            for name, (source, cache) in trees.items():
                output = work / f"{name.split()[0]}.pt"
                seconds[name].append(run_child(source, cache, files, output, args.threads))
                print(f"  round {round_ + 1}: {name:<22} {seconds[name][-1]:6.2f} s", flush=True)
        baseline_name, this_name = trees
        baseline_s, this_s = (statistics.median(seconds[name]) for name in trees)
        difference = (torch.load(work / "baseline.pt") - torch.load(work / "this.pt")).abs().max().item()
    print(f"median: {baseline_name} {baseline_s:.2f} s, {this_name} {this_s:.2f} s")
    print(f"speed-up: {baseline_s / this_s:.2f}×; largest output difference {difference:.2e}")
    if difference > args.tolerance:
        print(f"FAIL: the outputs differ by more than {args.tolerance:g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
