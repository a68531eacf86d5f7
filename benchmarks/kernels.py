"""Triton Newton–Schulz kernels against torch on a GPU: the whole default msign iteration in bf16.

For each size n ∈ {1024, 2048, 4096, 8192} and batch ∈ {1, 8}, times the default msign schedule
(Polar Express, its default number of iterations) on an already normalised bf16 (batch, n, n)
input, three ways, all running the same coefficients:
  - torch eager:     modman.linalg.newton_schulz (bmm/baddbmm, cuBLAS)
  - torch compiled:  the same function under torch.compile(dynamic=False)
  - triton:          modman.kernels.newton_schulz
and reports the speed-up of triton over the faster of the two torch versions (the issue's
baseline). Where launches dominate (small n), modman.kernels replays a CUDA graph of the whole run;
so that this is not mistaken for a kernel win, the torch path captured in a CUDA graph is timed
too ("graph" column, "vs graph" speed-up). TFLOP/s count the nominal
2n³ + 2n³ + 2n³ = 6n³ flops per iteration (X Xᵀ, S², B X; the half-tile saving is
*not* counted as flops, so the triton TFLOP/s is an effective rate). Timing: triton.testing.do_bench
(median) after a warm-up call that also runs the autotuner, so autotuning is excluded. Before
timing, both results are compared with a float64 run of the same iteration (relative Frobenius
error): the kernels must be as accurate as the torch path, not only as fast.

``--breakdown`` also times each product of one iteration alone against its torch counterpart
(X Xᵀ vs bmm, b·S + c·S² vs baddbmm, a·X + B X vs baddbmm), which says where a speed-up comes from.

Goal (issue 6): ≥ 1.4× at 4096², batch 8, on an H100; never slower at 1024².

Without a CUDA GPU this prints that it cannot measure and exits with status 0: the Triton
interpreter proves correctness (tests/kernels), not speed, and no number is invented.

Usage: python benchmarks/kernels.py [--full] [--breakdown] [--out PATH]
Writes benchmarks/results/kernels-<gpu>.json (rewritten after every row, so a cut-off run keeps
what it measured).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import time

import torch


def _relative_error(Y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((Y.double() - ref).norm() / ref.norm()).item()


def _graphed(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream); returns a replaying callable
    whose result is the graph's static output — the torch path without launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def _check_configs(dtypes: list) -> int:
    """Launch each autotune configuration of both kernels directly on odd shapes, bf16 and fp32,
    and compare with torch: the autotuner keeps whichever is fastest, so every one must be right.
    On Hopper the descriptor-load (TMA) configurations too, on a shape whose rows are 16-byte
    aligned (their layout rule) but end inside tiles. Returns the number of failing
    configurations (compile errors included)."""
    from modman.kernels import _triton_ns as impl

    major = torch.cuda.get_device_capability()[0]
    failures = 0
    for tma in (True, False) if impl.tma_wanted(major, impl.TMA_MIN_WORK) else (False,):
        for dtype in dtypes:
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            g = torch.Generator(device="cuda").manual_seed(0)
            X = torch.randn(3, 296 if tma else 300, 520, device="cuda", generator=g).to(dtype) / 30
            S = (X.float() @ X.float().mT).to(dtype)
            for kind, configs in (("sym", impl._sym_configs(major, tma)), ("apply", impl._apply_configs(major, tma))):
                for cfg in configs:
                    meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    try:
                        if kind == "sym":  # b·S + c·S² with b = 0.5, c = −1
                            out, want = torch.full_like(S, float("nan")), 0.5 * S.float() - S.float() @ S.float()
                            impl.launch_sym(S, out, -1.0, 0.5, S, config=meta, tma=tma)
                        else:  # a·X + B X with a = 0.5, B = S
                            out, want = torch.full_like(X, float("nan")), 0.5 * X.float() + S.float() @ X.float()
                            impl.launch_apply(S, X, out, 0.5, config=meta, tma=tma)
                        torch.cuda.synchronize()
                        err = ((out.float() - want).norm() / want.norm()).item()
                        ok = err < tol
                    except impl.triton.runtime.errors.OutOfResources as e:
                        # Too large for this GPU in this dtype: the autotuner skips such a configuration.
                        print(f"{kind:>5} {str(dtype):>14} tma={tma:d} n/a {e}  {meta}", flush=True)
                        continue
                    except Exception as e:  # a compile failure is a finding, reported per configuration
                        err, ok = repr(e)[:200], False
                    failures += not ok
                    print(f"{kind:>5} {str(dtype):>14} tma={tma:d} {'ok ' if ok else 'BAD'} {err}  {meta}", flush=True)
    print(f"{failures} failing configurations")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="include 8192² (slow; needs ~5 GiB)")
    parser.add_argument("--sizes", type=int, nargs="*", help="override the sizes")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="timing dtype (default bfloat16); with --check-configs, only this dtype")
    parser.add_argument("--breakdown", action="store_true", help="also time each product alone")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--check-configs", action="store_true",
                        help="only run every autotune configuration once, in bf16 and fp32, against torch")
    parser.add_argument("--out", type=pathlib.Path, help="results path (default benchmarks/results/kernels-<gpu>.json)")
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
    from modman.experiments.machine import machine as host_machine
    from modman.linalg import coefficients, default_steps
    from modman.linalg import newton_schulz as torch_newton_schulz

    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 16)))
    if args.check_configs:
        return _check_configs([getattr(torch, args.dtype)] if args.dtype else [torch.bfloat16, torch.float32])
    steps = default_steps("polar_express")
    coeffs = coefficients("polar_express", steps)
    sizes = args.sizes or ([1024, 2048, 4096, 8192] if args.full else [1024, 2048, 4096])
    gpu = torch.cuda.get_device_name()
    args.dtype = args.dtype or "bfloat16"
    dtype = getattr(torch, args.dtype)
    compiled = None if args.no_compile else torch.compile(torch_newton_schulz, dynamic=False)
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")  # noqa: E731

    # the shared record (CPU model and flags, threads, torch, load), with the GPU's own facts
    machine = dict(host_machine(), gpu=gpu, capability=list(torch.cuda.get_device_capability()),
                   triton=triton.__version__, tma_loads=kernels._impl().tma_wanted(torch.cuda.get_device_capability()[0], kernels._impl().TMA_MIN_WORK))
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") + ("" if dtype == torch.bfloat16 else f"-{args.dtype}")
    path = args.out or pathlib.Path(__file__).resolve().parent / "results" / f"kernels-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, products = [], []

    def write():
        path.write_text(json.dumps(dict(
            machine=machine, command=" ".join([*(f"{k}={v}" for k, v in sorted(os.environ.items())
                                                 if k.startswith("MODMAN_TRITON_")),  # the switches used
                                               "python benchmarks/kernels.py", *sys.argv[1:]]),
            schedule="polar_express", steps=steps, dtype=args.dtype,
            flops="nominal 6 n^3 per iteration per matrix (the half-tile saving is not counted)",
            timing="triton.testing.do_bench median (warmup 25 ms, rep 200 ms), after a warm-up call "
                   "that runs compilation and autotuning",
            error="relative Frobenius error against the same iteration in float64",
            rows=rows, products=products), indent=2) + "\n")

    print(f"GPU: {gpu}; msign = Polar Express, {steps} iterations, {args.dtype}, square inputs", flush=True)
    print(f"{'n':>5} {'batch':>5} {'eager ms':>9} {'compile ms':>10} {'graph ms':>9} {'triton ms':>9} "
          f"{'triton TF/s':>11} {'torch TF/s':>10} {'speed-up':>8} {'vs graph':>8} {'err torch':>9} "
          f"{'err triton':>10}", flush=True)
    for n in sizes:
        for batch in args.batches:
            g = torch.Generator(device="cuda").manual_seed(n + batch)
            X = torch.randn(batch, n, n, device="cuda", generator=g)
            X = (X / (torch.linalg.matrix_norm(X @ X.mT, keepdim=True).sqrt() * 1.01)).to(dtype)
            runs = {"eager": lambda: torch_newton_schulz(X, coeffs),
                    "triton": lambda: kernels.newton_schulz(X, coeffs)}
            if compiled is not None:
                runs["compile"] = lambda: compiled(X, coeffs)
            runs["torch_graph"] = _graphed(lambda: torch_newton_schulz(X, coeffs))
            t0 = time.perf_counter()
            outs = {k: f() for k, f in runs.items()}  # warm-up: compilation and autotuning
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - t0
            ref = torch_newton_schulz(X[:1].double(), coeffs)  # one matrix suffices for the error
            err = {k: _relative_error(outs[k][:1], ref) for k in ("eager", "triton")}
            assert torch.equal(outs["torch_graph"], outs["eager"])
            del ref, outs
            if not err["triton"] <= 1.5 * err["eager"] + 1e-3:
                raise SystemExit(f"triton is less accurate than torch at n={n}, batch={batch}: {err}")
            ms = {k: bench(f) for k, f in runs.items()}
            flops = 6 * n**3 * batch * steps
            best = min(ms["eager"], ms.get("compile", float("inf")))
            row = dict(n=n, batch=batch, eager_ms=ms["eager"], compile_ms=ms.get("compile"),
                       torch_graph_ms=ms["torch_graph"], triton_ms=ms["triton"],
                       triton_graph=kernels._graphs.wanted(X), triton_tflops=flops / ms["triton"] / 1e9,
                       best_torch_tflops=flops / best / 1e9, speedup=best / ms["triton"],
                       speedup_vs_torch_graph=ms["torch_graph"] / ms["triton"],
                       rel_error_torch=err["eager"], rel_error_triton=err["triton"],
                       warmup_s=warm_s)
            rows.append(row)
            write()
            print(f"{n:>5} {batch:>5} {ms['eager']:>9.3f} {ms.get('compile', float('nan')):>10.3f} "
                  f"{ms['torch_graph']:>9.3f} {ms['triton']:>9.3f} {row['triton_tflops']:>11.1f} "
                  f"{row['best_torch_tflops']:>10.1f} {row['speedup']:>7.2f}× "
                  f"{row['speedup_vs_torch_graph']:>7.2f}× {err['eager']:>9.2e} {err['triton']:>10.2e}", flush=True)

            if args.breakdown:
                a, b, c = coeffs[-1]
                S = X @ X.mT
                B = torch.baddbmm(S, S, S, beta=b, alpha=c)
                pairs = {
                    "gram": (lambda: X @ X.mT, lambda: kernels.gram(X)),
                    "gram_poly": (lambda: torch.baddbmm(S, S, S, beta=b, alpha=c), lambda: kernels.gram_poly(S, b, c)),
                    "apply_poly": (lambda: torch.baddbmm(X, B, X, beta=a), lambda: kernels.apply_poly(B, X, a)),
                }
                for name, (t_fn, k_fn) in pairs.items():
                    k_fn()
                    t_ms, k_ms = bench(t_fn), bench(k_fn)
                    products.append(dict(n=n, batch=batch, product=name, torch_ms=t_ms, triton_ms=k_ms,
                                         torch_tflops=2 * n**3 * batch / t_ms / 1e9, speedup=t_ms / k_ms))
                    print(f"      {name:>10}: torch {t_ms:8.3f} ms ({2 * n**3 * batch / t_ms / 1e9:6.1f} TF/s)"
                          f"  triton {k_ms:8.3f} ms  {t_ms / k_ms:5.2f}×", flush=True)
                write()
            del runs
            torch.cuda.empty_cache()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
