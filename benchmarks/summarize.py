"""Print the README's results table from benchmarks/results/*.json (never typed by hand).

    python benchmarks/summarize.py [--results DIR]
"""
from __future__ import annotations

import argparse
import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def load(name: str):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fmt(x, spec=".3g"):
    return "—" if x is None else format(x, spec)


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])  # --help, and no stray options
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS, help="the results folder (default: benchmarks/results)")
    RESULTS = parser.parse_args().results
    rows = ["| benchmark | result | file |", "| --- | --- | --- |"]
    d = load("msign")
    if d:
        worst = max(b["max_abs_sigma_minus_1"] for b in d["bar"])
        its = max(b["iterations"] for b in d["bar"])
        shapes = {tuple(b["shape"]) for b in d["bar"]}
        largest = "×".join(map(str, max(shapes, key=lambda s: s[0] * s[1])))
        rows.append(f"| msign fp32, κ = 1e3, log-spaced and flat-top, {len(shapes)} shapes up to {largest} | "
                    f"max\\|σ−1\\| = {worst:.1e} "
                    f"in {its} Polar Express iterations | msign.json |")
    d = load("main_job")
    if d:
        for r in d["runs"]:
            rows.append(f"| `modman` main job ({d['args']['steps']} steps), {r['optimizer']} lr {r['lr']:g} | "
                        f"train {r['train_acc']:.1%}, test {r['test_acc']:.1%}, "
                        f"{r['optimizer_seconds_per_step'] * 1e3:.1f} ms per optimizer step | main_job.json |")
    for file in ("solvers", "solvers_h1024"):
        d = load(file)
        if not d:
            continue
        label = d["training"]["model"].split("MLP ", 1)[1].split(",")[0]  # e.g. 784→256→256→10
        for name, s in d.items():
            if not isinstance(s, dict) or "msign_calls_per_step" not in s:
                continue
            gap = s.get("duality_gap")
            gap = gap.get("max") if isinstance(gap, dict) else gap
            res = s.get("tangent_residual")
            res = res.get("max") if isinstance(res, dict) else res
            meq = s.get("msign_equivalents_per_step", s["msign_calls_per_step"])
            rows.append(f"| solver `{name}` in training, MLP {label} (warm starts) | {fmt(meq)} msign-eq/matrix/step, "
                        f"max gap {fmt(gap, '.1e')}, max residual {fmt(res, '.1e')}, "
                        f"{fmt(s.get('step_ratio_vs_own_muon'))}× own Muon, "
                        f"{fmt(s.get('step_ratio_vs_torch_muon'))}× torch.optim.Muon | {file}.json |")
    d = load("mnist1d_solvers")
    if d:
        parts = ", ".join(f"{s} {r['test_acc_mean']:.3f} ({r['optimizer_s_per_step_median'] * 1e3:.0f} ms)"
                          for s, r in d["solvers"].items())
        rows.append(f"| MNIST-1D per solver ({len(d['seeds'])} seeds × {d['steps']} steps): test accuracy "
                    f"(optimizer step) | {parts} | mnist1d_solvers.json |")
    d = load("first_steps")
    if d:
        parts = ", ".join(f"{r['step_s']:.1f}" for r in d["steps"])
        gap = max(m["duality_gap"] for r in d["steps"] for m in r["matrices"])
        rows.append(f"| first steps, {d['model']} ({d['optimizer'].split('(')[0]} default solver) | seconds per step: "
                    f"{parts}; max certified gap {gap:.1e} | first_steps.json |")
    d = load("optimizers")
    if d:
        for spec, rows_ in d["models"].items():
            muon_run = rows_.get("muon_fp32", {}).get("command")

            def notes(r):  # rows merged from other runs carry their own command and their own run's ratio
                out = [r["timed"]] if "timed" in r else []
                return out + (["other run"] if r.get("command") != muon_run else [])

            parts = ", ".join(f"{n} {r['step_s_median']:.2f} s ({r['ratio_vs_own_muon_fp32']:.1f}×"
                              + "".join(f", {x}" for x in notes(r)) + ")" for n, r in rows_.items())
            rows.append(f"| optimizer step, MLP {spec} (× own Muon fp32 of the same run) | {parts} | optimizers.json |")
    d = load("step_memory")
    if d:
        for shape, rows_ in d["shapes"].items():
            parts = ", ".join(f"{n.replace('manifold_muon:', '')} {r['peak_x']:.2f}×" + (" (capped iterations)" if "note" in r else "")
                              for n, r in rows_.items()
                              if "peak_x" in r and n in ("manifold_muon:anderson", "manifold_muon:closed_form",
                                                         "manifold_muon:newton",
                                                         "manifold_muon:projected", "muon_fp32", "adamw"))
            rows.append(f"| peak temporary memory of one step, {shape} (× the parameter) | {parts} | step_memory.json |")
    d = load("batching")
    if d:
        parts = ", ".join(f"{r['shape'][0]}×{r['shape'][1]}×{r['batch']} {r['speedup']:.2f}×" for r in d["rows"])
        gap = max(max(r["max_gap_separate"], r["max_gap_batched"]) for r in d["rows"])
        rows.append(f"| one batched solve of same-shape matrices against one solve each ({d['solver']}, "
                    f"{d['dtype']}, every gap ≤ {gap:.1e}) | {parts} | batching.json |")
        if d.get("optimizer_rows"):
            parts = ", ".join(f"d={r['d']}×{r['blocks']} blocks {r['speedup']:.2f}× (peak {r['peak_x_stacked']:.0f}× "
                              f"vs {r['peak_x_one_at_a_time']:.0f}×)" for r in d["optimizer_rows"])
            rows.append(f"| ManifoldMuon step, same-shape matrices stacked (foreach) against one at a time, MLPs of "
                        f"d→d→4d→d blocks ({d['solver']}, {d['dtype']}; peak temporary memory × the largest "
                        f"parameter) | {parts} | batching.json |")
    d = load("step_overhead")
    if d:
        for model, times in d["steps"].items():
            parts = ", ".join(f"{k} {v['step_s_median'] * 1e3:.1f} ms ({v['ratio_vs_torch_adamw_foreach']:.2f}×)"
                              for k, v in times.items())
            rows.append(f"| optimizer step on many small parameters, model \"{model}\" (× torch AdamW foreach, "
                        f"same run) | {parts} | step_overhead.json |")
        parts = ", ".join(f"{k} layers {v * 1e3:.0f} ms" for k, v in d["construction_s"].items())
        rows.append(f"| ManifoldMuon construction, MLP of Linear(16, 16) layers | {parts} | step_overhead.json |")
    d = load("drift")
    if d:
        parts = ", ".join(f"lr {r['lr']}: {r['max_distance']:.1e}" for r in d["results"])
        steps = {r["steps"] for r in d["results"]}
        steps = "10⁴" if steps == {10000} else "/".join(map(str, sorted(steps)))
        rows.append(f"| closed-form retraction drift, {steps} fp32 steps, max\\|σ−1\\| | {parts} | drift.json |")
    for name in ("lr_transfer", "lr_transfer_grid4", "lr_transfer_out32"):
        d = load(name)
        if not d:
            continue
        grid = f"grid ×{d['grid_ratio']:.3g}, logits ×{d['out_mult']:g}"
        for opt, archs in d["best_lr_shift"].items():
            for arch, sh in archs.items():
                parts = []
                if "width_shift" in sh:
                    parts.append(f"width 64→512 {sh['width_shift']:.2f}×")
                fit = sh.get("depth_shift_fit")  # None where a sweep's parabola fit failed (lr_transfer.py)
                parts.append(f"depth 2→8 {sh['depth_2_8_shift']:.2f}× (all depths by parabola fits "
                             + (f"{fit:.2f}×)" if fit is not None else "n/a)"))
                if "depth_3_8_shift" in sh:
                    parts.append(f"depth 3→8 {sh['depth_3_8_shift']:.2f}×")
                if "blocks_2_8_shift" in sh:
                    parts.append(f"blocks 2→8 {sh['blocks_2_8_shift']:.2f}×")
                rows.append(f"| lr transfer, {opt}, {arch}, {grid} | best-lr shift: {', '.join(parts)} | {name}.json |")
    d = load("toy_pretrain")
    if d:
        r = d["recipe"]
        rows.append(f"| toy LM d{r['d_model']}×{r['n_layers']}, {r['task_kwargs']['n_digits']}-digit {r['task']} | "
                    f"{d['test_accuracy']:.1%} held-out exact match after "
                    f"{d['steps']} steps, {d['train_seconds']:.0f} s training on {d['machine']['threads']} threads "
                    f"(bar: ≥ 95 % within 300 s) | toy_pretrain.json |")
    for name in ("lora", "lora_base-ls_sub", "lora_base-ls-256_sub", "lora_base-ls-512_sub"):
        d = load(name)
        if d and "lr_ratio" in d:
            setup = d["setup"]
            ratios = ", ".join(f"r={k}: {v:.3g}" for k, v in sorted(d["lr_ratio"].items(), key=lambda kv: int(kv[0])))
            rows.append(f"| LoRA lr ratio (best LoRA lr / best full-FT lr): {setup['base']} on "
                        f"{setup['task']}, {setup['steps']} steps | {ratios} | {name}.json |")
    # every headline setting benchmarks/opd.py has written (one file per setting)
    for name in sorted(p.stem for p in RESULTS.glob("opd*.json")):
        d = load(name)
        file = f"{name}.json"
        if d and "promoted_from" in d:  # opd.json's top-level steps_to_target are another file's (its own row)
            d = {**d, **d["addition_headline"]}
            file += ", its addition_headline"
        if d and "steps_to_target" in d:
            stt = {k: "not within cap" if v is None else v for k, v in d["steps_to_target"].items()}
            rows.append(f"| OPD steps to {d.get('target_accuracy', 0.95):.0%} of teacher (cap {d.get('cap')}), "
                        f"{d.get('task', 'addition(3)').split(':')[0]}, teacher {d['teacher']['recipe']}, "
                        f"start {d['student_start']['accuracy']:.0%}"
                        + (f", grad clip {d['per_step']['grad_clip']:g}" if d["per_step"].get("grad_clip") else "")
                        + " | "
                        f"opd {stt.get('opd')}, rl {stt.get('rl')}, sft {stt.get('sft')} | {file} |")
    fg = (load("opd") or {}).get("forgetting", {})
    if "median_over_seeds" in fg:
        m = fg["median_over_seeds"]
        cell = "; ".join(f"{stage}: old {m[stage]['addition']:.0%}, new {m[stage]['new_task']:.0%}, "
                         f"KL {m[stage]['kl_to_original']:.1f}"
                         for stage in ("fine_tune", "opd", "sft_self"))
        # (files written before recover_steps was recorded ran opd.py's default, 100)
        rows.append(f"| forgetting recovery, median of {len(fg['per_seed'])} seeds (addition after a "
                    f"{fg['new_task']} fine-tune; {fg.get('recover_steps', 100)} recovery steps) | {cell} | opd.json |")
    d = load("tracking_overhead")
    if d:
        parts = ", ".join(f"{k} {v['overhead']:.1%}" for k, v in d["results"].items())
        rows.append(f"| spectrum tracking every {d.get('every')} steps, overhead per step | {parts} | "
                    "tracking_overhead.json |")
    d = load("tracker_accuracy")
    if d:
        parts = ", ".join(f"{k} σ_max {v['sigma_max']['median']:.0e}, σ_min {v['sigma_min']['median']:.0e}, "
                          + (f"distance {v['distance']['median']:.0e}, " if k == "manifold_muon" and "distance" in v else "")
                          + f"‖ΔW‖₂ {v['update_norm']['median']:.0e}" for k, v in d["results"].items())
        rows.append(f"| tracker estimates between spectrum steps, median relative error | {parts} | "
                    "tracker_accuracy.json |")
    d = load("distributed")
    if d:
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in d["seconds_per_step"].items())
        rows.append(f"| ManifoldMuon data parallel, {d['what'].split(' on ', 1)[1].split(',')[0]}: seconds per "
                    f"optimizer step | {parts}; {d['speedup_vs_same_cores_threads']:.2f}× the same cores as "
                    f"threads, bitwise equal: {d['ranks_bitwise_equal_one_process']} | distributed.json |")
    for path in sorted(RESULTS.glob("kernels-*.json")):
        d = json.loads(path.read_text())
        parts = ", ".join(f"{r['n']}²×{r['batch']} {r['speedup']:.2f}× ({r['triton_tflops']:.0f} TF/s)"
                          for r in d["rows"])
        peer = "eager/compile" if all(r.get("compile_ms") for r in d["rows"]) else "eager"
        off = ", TMA loads off" if d["machine"].get("tma_loads") is False else ""
        rows.append(f"| Triton msign ({d['dtype']}, {d['steps']} its{off}) on {d['machine']['gpu']}, × faster of torch "
                    f"{peer} | {parts} | {path.name} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
