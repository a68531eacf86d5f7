"""Triton Newton–Schulz kernels against torch on a GPU: the whole default msign iteration in bf16.

For each size n ∈ {1024, 2048, 4096, 8192} and batch ∈ {1, 8}, times the default msign schedule
(Polar Express, its default number of iterations) on an already normalised bf16 (batch, n, n)
input, three ways, all running the same coefficients:
  - torch eager:     modman.linalg.newton_schulz (bmm/baddbmm, cuBLAS)
  - torch compiled:  the same function under torch.compile(dynamic=False)
  - triton:          modman.kernels.newton_schulz
and reports the speed-up of triton over the faster of the two torch versions, with TFLOP/s counted
as the nominal 4n³ + 2n³ = 6n³ flops per iteration (X Xᵀ, S², B X; the half-tile saving is *not*
counted as flops, so the triton TFLOP/s is an effective rate). Timing: triton.testing.do_bench
(median) after a warm-up call that also runs the autotuner, so autotuning is excluded. The
torch and triton results are checked to agree before timing.

Goal (issue 6): ≥ 1.4× at 4096², batch 8, on an H100.

Without a CUDA GPU this prints that it cannot measure and exits with status 0: the Triton
interpreter proves correctness (tests/kernels), not speed, and no number is invented.

Usage: python benchmarks/kernels.py [--full]   (default: 1024…4096; --full adds 8192)
Writes benchmarks/results/kernels-<gpu>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="include 8192² (slow; needs ~5 GiB)")
    parser.add_argument("--sizes", type=int, nargs="*", help="override the sizes")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    args = parser.parse_args()

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA GPU (or TRITON_INTERPRET=1 is set). The Triton "
              "interpreter proves correctness (tests/kernels), not speed: nothing measured, "
              "nothing written.")
        return 0
    try:
        import triton
        import triton.testing
    except ImportError:
        print("benchmarks/kernels.py: triton is not installed (pip install 'modman[triton]'); nothing measured.")
        return 0

    from modman import kernels
    from modman.linalg import coefficients, default_steps
    from modman.linalg import newton_schulz as torch_newton_schulz

    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 16)))
    steps = default_steps("polar_express")
    coeffs = coefficients("polar_express", steps)
    sizes = args.sizes or ([1024, 2048, 4096, 8192] if args.full else [1024, 2048, 4096])
    gpu = torch.cuda.get_device_name()
    compiled = torch.compile(torch_newton_schulz, dynamic=False)

    rows = []
    header = f"{'n':>5} {'batch':>5} {'eager ms':>9} {'compile ms':>10} {'triton ms':>9} " \
             f"{'triton TFLOP/s':>14} {'best torch TFLOP/s':>18} {'speed-up':>8}"
    print(f"GPU: {gpu}; msign = Polar Express, {steps} iterations, bf16, square inputs\n{header}")
    for n in sizes:
        for batch in args.batches:
            g = torch.Generator(device="cuda").manual_seed(0)
            X = torch.randn(batch, n, n, device="cuda", generator=g)
            X = (X / (torch.linalg.matrix_norm(X @ X.mT, keepdim=True).sqrt() * 1.01)).bfloat16()
            runs = {
                "eager": lambda: torch_newton_schulz(X, coeffs),
                "compile": lambda: compiled(X, coeffs),
                "triton": lambda: kernels.newton_schulz(X, coeffs),
            }
            outs = {k: f() for k, f in runs.items()}  # warm-up: compilation and autotuning
            torch.cuda.synchronize()
            diff = (outs["triton"].float() - outs["eager"].float()).abs().max().item()
            if not diff < 0.1:  # bf16 over 10 iterations: both orthogonal to ~1e-2
                raise SystemExit(f"triton and torch disagree at n={n}, batch={batch}: max diff {diff}")
            ms = {k: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median") for k, f in runs.items()}
            flops = 6 * n**3 * batch * steps
            best_torch = min(ms["eager"], ms["compile"])
            row = dict(n=n, batch=batch, steps=steps, eager_ms=ms["eager"], compile_ms=ms["compile"],
                       triton_ms=ms["triton"], triton_tflops=flops / ms["triton"] / 1e9,
                       best_torch_tflops=flops / best_torch / 1e9, speedup=best_torch / ms["triton"],
                       max_abs_diff_vs_eager=diff)
            rows.append(row)
            print(f"{n:>5} {batch:>5} {ms['eager']:>9.3f} {ms['compile']:>10.3f} {ms['triton']:>9.3f} "
                  f"{row['triton_tflops']:>14.1f} {row['best_torch_tflops']:>18.1f} {row['speedup']:>7.2f}×")

    machine = dict(gpu=gpu, capability=list(torch.cuda.get_device_capability()), cpu=platform.processor(),
                   threads=torch.get_num_threads(), torch=torch.__version__, triton=triton.__version__,
                   python=sys.version.split()[0])
    out_dir = pathlib.Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    path = out_dir / f"kernels-{slug}.json"
    path.write_text(json.dumps(dict(machine=machine, schedule="polar_express", dtype="bfloat16",
                                    timing="triton.testing.do_bench median, after warm-up and autotuning",
                                    rows=rows), indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
