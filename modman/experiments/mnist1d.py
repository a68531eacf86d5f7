"""The blog's kind of experiment on MNIST-1D: a bias-free ReLU MLP, every layer constrained.

MLP 40 → width → … → 10 (``depth`` linear layers, no biases, ReLU), batch 512, learning rate
decaying linearly to 0, trained with one optimizer from a registry of the ones a user would
compare: modman's ManifoldMuon and Muon, torch.optim.Muon (when the installed torch has it)
and AdamW. ``train`` returns the curves, timings and final singular values of every weight.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .._checks import is_finite_real, is_int
from ..data import load_mnist1d

# name -> default learning rate at the default recipe (MLP 40→128→128→10, batch 512, 1000 steps)
DEFAULT_LR = {"manifold_muon": 0.1, "muon": 0.05, "torch_muon": 0.05, "adamw": 1e-2}


def available_optimizers() -> list[str]:
    names = ["manifold_muon", "muon", "adamw"]
    if hasattr(torch.optim, "Muon"):
        names.insert(2, "torch_muon")
    return names


def make_mlp(width: int = 128, depth: int = 3, d_in: int = 40, n_classes: int = 10) -> nn.Sequential:
    """``depth`` bias-free Linear layers with ReLU between them."""
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be ≥ 1, got depth={depth}, width={width}")
    dims = [d_in] + [width] * (depth - 1) + [n_classes]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_optimizer(name: str, model: nn.Module, lr: float | None = None, **options) -> torch.optim.Optimizer:
    """An optimizer by name over every parameter of ``model``."""
    from .. import ManifoldMuon, Muon

    if name not in DEFAULT_LR:  # (a bare KeyError 'sgd' came first)
        raise ValueError(f"unknown optimizer {name!r}; choose from {available_optimizers()}")
    lr = DEFAULT_LR[name] if lr is None else lr
    if name == "manifold_muon":
        options.setdefault("budget", "uniform")  # the blog's setting: one lr for every layer
        return ManifoldMuon(model.modules(), lr=lr, **options)
    if name == "muon":
        # fp32 Newton–Schulz: on CPUs without native bf16 (no avx512_bf16/AMX) bf16 matmuls are
        # emulated and ~25× slower than fp32; torch_muon below keeps torch's bf16 as shipped.
        options.setdefault("ns_dtype", "float32")
        return Muon(model.modules(), lr=lr, weight_decay=0.0, **options)
    if name == "torch_muon":
        if not hasattr(torch.optim, "Muon"):
            raise ValueError("this torch has no torch.optim.Muon (added in torch 2.9)")
        return torch.optim.Muon(model.parameters(), lr=lr, weight_decay=0.0, **options)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, **options)
    raise ValueError(f"unknown optimizer {name!r}; choose from {available_optimizers()}")


@dataclass
class RunResult:
    optimizer: str
    lr: float
    history: list[dict] = field(default_factory=list)  # {step, loss, train_acc?, test_acc?}
    train_acc: float = 0.0
    test_acc: float = 0.0
    seconds_per_step: float = 0.0  # forward + backward + optimizer step, median
    optimizer_seconds_per_step: float = 0.0  # optimizer.step alone, median
    singular_values: dict[str, list[float]] = field(default_factory=dict)
    duality_gap: float | None = None  # median over steps of the worst certified gap (ManifoldMuon)
    model: nn.Module | None = None


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(-1) == y).float().mean().item()


def train(
    optimizer: str = "manifold_muon",
    *,
    steps: int = 1000,
    width: int = 128,
    depth: int = 3,
    batch_size: int = 512,
    lr: float | None = None,
    seed: int = 0,
    eval_every: int = 100,
    data: dict | None = None,
    progress: bool = False,
    callback: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
    optimizer_options: dict | None = None,
    logit_scale: float = 1.0,
) -> RunResult:
    """Train the MLP on MNIST-1D with one optimizer; lr decays linearly to 0 over ``steps``.

    ``logit_scale`` multiplies the logits in the loss: a constrained head has all its singular
    values 1, so the network's output scale is the architecture's, and cross-entropy wants larger
    logits (the README's ×8; accuracy, an argmax, is unchanged by it).

    ``callback(step, model, optimizer)`` runs after every optimizer step (e.g. a tracker).
    """
    import warnings

    if not is_int(steps) or steps < 1:  # (0: a ZeroDivisionError in the schedule)
        raise ValueError(f"steps must be an int ≥ 1, got {steps!r}")
    steps = int(steps)
    if not (is_finite_real(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    data = data if data is not None else load_mnist1d()
    torch.manual_seed(seed)
    model = make_mlp(width, depth, d_in=data["x"].shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the initial projection reports each layer
        opt = make_optimizer(optimizer, model, lr, **(optimizer_options or {}))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1 - t / steps))
    gen = torch.Generator().manual_seed(seed)
    n = data["x"].shape[0]
    result = RunResult(optimizer=optimizer, lr=opt.param_groups[0]["lr"])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"{optimizer:>13}", leave=True)
    step_times, opt_times, gaps = [], [], []
    for step in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(logit_scale * model(data["x"][idx]), data["y"][idx])
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        schedule.step()
        step_times.append(t2 - t0)
        opt_times.append(t2 - t1)
        stats = getattr(opt, "last_step_stats", None) or {}
        step_gaps = [float(v["duality_gap"].max()) for v in stats.values()
                     if isinstance(v.get("duality_gap"), torch.Tensor) and not bool(v["duality_gap"].isnan().any())]
        if step_gaps:
            gaps.append(max(step_gaps))
        if callback is not None:
            callback(step, model, opt)
        record = {"step": step, "loss": loss.item()}
        if eval_every and (step % eval_every == 0 or step == steps - 1):
            model.eval()
            record["train_acc"] = accuracy(model, data["x"], data["y"])
            record["test_acc"] = accuracy(model, data["x_test"], data["y_test"])
            model.train()
        result.history.append(record)
        if bar is not None:
            bar.update(1)
            if "test_acc" in record:
                bar.set_postfix(loss=f"{record['loss']:.3f}", test_acc=f"{record['test_acc']:.3f}")
    if bar is not None:
        bar.close()
    result.train_acc = accuracy(model, data["x"], data["y"])
    result.test_acc = accuracy(model, data["x_test"], data["y_test"])
    result.seconds_per_step = float(torch.tensor(step_times).median())
    result.optimizer_seconds_per_step = float(torch.tensor(opt_times).median())
    result.duality_gap = float(torch.tensor(gaps).median()) if gaps else None
    # a diverged run's weights are not finite: NaN singular values, not an SVD error that lost every
    # other optimizer's results at the end of a CLI run (a probe: --lr adamw=1e20)
    result.singular_values = {
        name: (torch.linalg.svdvals(p.detach().double()).tolist() if bool(torch.isfinite(p).all())
               else [math.nan] * min(p.shape))
        for name, p in model.named_parameters() if p.ndim == 2
    }
    result.model = model
    return result
