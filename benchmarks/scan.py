"""Selective scan: speed and peak memory of the backends against the step-by-step reference.

Shapes are those of one Mamba block of the enhancer: B=1, D=512, N=16, G=4 (four scan directions), with
delta_softplus, delta_bias, D and z. On CPU "torch" is the backend as shipped (the C++ kernel) and
"chunked" the same backend with the kernel switched off (SEMI_LLIE_CPU_KERNEL=0): the pure-torch fallback.
Every (backend, L, pass) runs in its own subprocess so that its peak memory is its own: peak RSS above the
RSS after building the inputs on CPU, torch's peak allocated bytes on CUDA. "× u" is that peak in units of
size(u) = B·D·L·4 bytes: constant in L means O(B·D·L) extra memory.

    python benchmarks/scan.py                          # CPU, 2 threads, L in 1024 4096 16384 65536
    python benchmarks/scan.py --lengths 1024 4096
    python benchmarks/scan.py --device cuda            # cuda (mamba_ssm, if installed) vs torch vs reference

The reference is measured up to --reference-max-length; above it, its time and memory are extrapolated
linearly from the longest measured length (it runs L identical steps) and marked "est.".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

BATCH, CHANNELS, STATE, GROUPS = 1, 512, 16, 4
PASSES = ("forward", "forward+backward")
# The torch backend with its C++ CPU kernel switched off: the pure-torch fallback.
CHUNKED = "chunked"


def measure(backend: str, length: int, mode: str, device: str, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds and peak extra bytes of one pass, in this (fresh) process."""
    import torch

    from semi_llie.ops import selective_scan

    scan_backend = "torch" if backend == CHUNKED else backend
    if length > 64:  # a small run first loads the code pages and thread pools the peak should not count
        measure(backend, 64, mode, device, 1)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device)

    inputs = {
        "u": rand(BATCH, CHANNELS, length),
        "delta": rand(BATCH, CHANNELS, length, scale=0.1),
        "A": -torch.arange(1, STATE + 1, dtype=torch.float32).repeat(CHANNELS, 1).to(device),
        "B": rand(BATCH, GROUPS, STATE, length),
        "C": rand(BATCH, GROUPS, STATE, length),
        "D": rand(CHANNELS),
        "z": rand(BATCH, CHANNELS, length),
        "delta_bias": torch.full((CHANNELS,), -4.0, device=device),  # softplus(-4) ≈ 0.018, Mamba's dt range
    }
    grad_output = rand(BATCH, CHANNELS, length)
    for tensor in inputs.values():
        tensor.requires_grad_(mode == "forward+backward")

    def run_once() -> None:
        with torch.set_grad_enabled(mode == "forward+backward"):
            out = selective_scan(**inputs, delta_softplus=True, backend=scan_backend)
            if mode == "forward+backward":
                out.backward(grad_output)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = []
    for _ in range(repeats):
        for tensor in inputs.values():
            tensor.grad = None
        start = time.perf_counter()
        run_once()
        seconds.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"seconds": min(seconds), "peak_bytes": max(peak, 0)}


def run_child(
    backend: str, length: int, mode: str, device: str, threads: int, repeats: int
) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--child",
        backend,
        str(length),
        mode,
        device,
        str(threads),
        str(repeats),
    ]
    from semi_llie.ops.cpu_kernel import DISABLE_ENV

    env = {**os.environ, DISABLE_ENV: "0"} if backend == CHUNKED else None
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{backend} L={length} {mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--reference-max-length",
        type=int,
        default=None,
        help="longest L the reference really runs (default 16384 on CPU, 65536 on CUDA)",
    )
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        backend, length, mode, device, threads, repeats = args.child
        import torch

        torch.set_num_threads(int(threads))
        print(json.dumps(measure(backend, int(length), mode, device, int(repeats))))
        return 0

    import torch

    from semi_llie.ops import kernel_available

    backends = ["torch", CHUNKED, "reference"]
    if args.device == "cuda":
        backends.remove(CHUNKED)  # on CUDA tensors the torch backend is the chunked scan
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible")
        if kernel_available():
            backends.insert(0, "cuda")
        else:
            print("mamba_ssm is not installed: the cuda backend is skipped")
    reference_max = args.reference_max_length or (16384 if args.device == "cpu" else 65536)
    print(
        f"device={args.device} threads={args.threads} B={BATCH} D={CHANNELS} N={STATE} G={GROUPS} "
        f"cpus={os.cpu_count()} load average (1 min) at start={os.getloadavg()[0]:.2f}"
    )

    rows = []
    for length in sorted(args.lengths):
        for backend in backends:
            for mode in PASSES:
                if backend == "reference" and length > reference_max:
                    measured = [
                        r
                        for r in rows
                        if r["backend"] == "reference" and r["mode"] == mode and not r["estimate"]
                    ]
                    if not measured:
                        print(
                            f"reference L={length} {mode}: skipped (> --reference-max-length, nothing to "
                            "extrapolate from)"
                        )
                        continue
                    basis = max(measured, key=lambda r: r["length"])
                    scale = length / basis["length"]
                    result = {"seconds": basis["seconds"] * scale, "peak_bytes": basis["peak_bytes"] * scale}
                    rows.append(
                        {"backend": backend, "length": length, "mode": mode, "estimate": True, **result}
                    )
                    continue
                repeats = 3 if length <= 4096 else 1
                result = run_child(backend, length, mode, args.device, args.threads, repeats)
                rows.append({"backend": backend, "length": length, "mode": mode, "estimate": False, **result})
                print(
                    f"  {backend:9s} L={length:6d} {mode:17s} {result['seconds']:9.3f} s "
                    f"{result['peak_bytes'] / 2**20:9.1f} MiB   load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    print_table(rows, backends)
    print(f"load average (1 min) at end={os.getloadavg()[0]:.2f}")
    return 0


def print_table(rows: list[dict], backends: list[str]) -> None:
    table = {(r["backend"], r["length"], r["mode"]): r for r in rows}
    header = (
        f"{'L':>6} {'backend':9} {'fwd s':>9} {'fwd+bwd s':>10} {'peak fwd+bwd':>13} {'× u':>6} "
        f"{'fwd speedup':>12} {'fwd+bwd speedup':>16} {'memory ratio':>13}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for length in sorted({r["length"] for r in rows}):
        size_u = BATCH * CHANNELS * length * 4
        reference = {m: table.get(("reference", length, m)) for m in PASSES}
        for backend in backends:
            forward, both = table.get((backend, length, PASSES[0])), table.get((backend, length, PASSES[1]))
            if forward is None or both is None:
                continue
            mark = " est." if both["estimate"] else ""
            cells = [
                f"{length:>6} {backend:9} {forward['seconds']:9.3f} {both['seconds']:10.3f}",
                f"{both['peak_bytes'] / 2**20:9.1f} MiB {both['peak_bytes'] / size_u:6.1f}",
            ]
            if backend != "reference" and reference[PASSES[0]] and reference[PASSES[1]]:
                est = " est." if reference[PASSES[1]]["estimate"] else ""
                cells.append(
                    f"{reference[PASSES[0]]['seconds'] / forward['seconds']:11.1f}x"
                    f"{reference[PASSES[1]]['seconds'] / both['seconds']:15.1f}x"
                    f"{both['peak_bytes'] / max(reference[PASSES[1]]['peak_bytes'], 1):13.3f}{est}"
                )
            print(" ".join(cells) + mark)
    print("speedup = reference time / backend time; memory ratio = backend peak / reference peak (fwd+bwd)")


if __name__ == "__main__":
    sys.exit(main())
