"""A few-minute CPU pretraining recipe, with checkpoints cached by the recipe's hash.

``pretrain("base")`` returns a model trained on 3-digit addition (reversed answers) to high
held-out accuracy: the starting point for LoRA fine-tuning (e.g. on ``modular_addition``) and the
teacher for on-policy distillation. ``pretrain("student")`` is a smaller model trained briefly on
the same task, to be distilled. The first call trains and writes
``<cache>/toy/<name>-<hash>/{config.json, model.safetensors, recipe.json, metrics.json}``; later
calls with the same recipe load it. The hash covers every field of the recipe except its name,
plus ``RECIPE_VERSION`` (bumped whenever the training code changes what a recipe produces), so
``"teacher"`` and ``"base"``, which differ only in name, have the same hash; the folder name
carries the recipe's name as well, though, so each of them is trained and stored once on its own
(to the same weights, on the same machine and torch build).

The cache folder is ``$MODMAN_CACHE/toy`` if set, else ``$XDG_CACHE_HOME/modman/toy`` (if
absolute), else ``~/.cache/modman/toy`` (:func:`cache_dir`; ``~`` is expanded). ``MODMAN_CACHE`` names the cache root of all of
modman, hence the ``toy`` below it; the ``cache`` argument of :func:`pretrain`,
:func:`checkpoint_path` and :func:`store` names the folder of the toy checkpoints itself:
``pretrain(cache=X)`` stores under ``X/<name>-<hash>``, not ``X/toy/<name>-<hash>``.

Training is AdamW (decoupled weight decay on matrices only) with linear warm-up and cosine decay to
10 % of the peak rate, loss on completion tokens only (the prompt is uniformly random, so
predicting it teaches nothing), fresh training problems every step, and a fixed seed, so on the
same machine and torch build the same recipe gives the same weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import tasks as tasks_module
from .model import TinyCausalLM, TinyConfig, shifted_cross_entropy

RECIPE_VERSION = 1
_TASKS = {
    "addition": tasks_module.addition,
    "modular_addition": tasks_module.modular_addition,
    "subtraction": tasks_module.subtraction,
    "keyvalue": tasks_module.keyvalue,
    "substitution": tasks_module.substitution,
}


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a pretrained checkpoint."""

    name: str = "custom"
    task: str = "addition"
    task_kwargs: dict = field(default_factory=lambda: {"n_digits": 3, "format": "reversed"})
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_len: int = 32
    # Learned absolute positions: in a fixed-format prompt, answer digit j must read operand
    # digits at fixed absolute places whose distance from it changes with j; rotary positions
    # see only distances and learned this task about twice as slowly in our runs.
    positions: str = "learned"
    steps: int = 1500
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    # Label smoothing ε of the training loss. 0 trains to near-zero loss, and the model then puts
    # log-prob −20…−36 on every token it did not see; ε > 0 bounds its confidence (a wrong token
    # keeps ≈ log(ε/V)), closer to a pretrained LM's calibration when it is fine-tuned elsewhere.
    label_smoothing: float = 0.0
    seed: int = 0

    def __post_init__(self):
        """Refuse a recipe that could not train, or would train wrongly, naming the field."""
        # The name becomes a folder name inside the cache: it must not reach outside it.
        if (not isinstance(self.name, str) or not self.name or "/" in self.name
                or "\\" in self.name or ".." in self.name):
            raise ValueError(f"name must be a non-empty string without '/', '\\' or '..', got "
                             f"{self.name!r}")
        if self.task not in _TASKS:
            raise ValueError(f"task must be one of {sorted(_TASKS)}, got {self.task!r}")
        # Python ints only (not numpy's): the hash serialises the fields as JSON.
        for name, minimum in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("seed", 0),
                              ("d_model", 1), ("n_layers", 1), ("n_heads", 1), ("max_len", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

        def real(value) -> bool:
            # Python numbers only (NumPy's float64 is one): the hash serialises the fields as JSON,
            # which a NumPy float32 is not
            return (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value))

        if not (real(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        # grad_clip 0 turns clipping off; a negative one would flip the gradient (ascent).
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (real(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (real(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(real(b) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not (real(self.label_smoothing) and 0.0 <= self.label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        # Build the task and the model's config now, so that a bad task_kwargs or architecture
        # fails here rather than when training starts.
        if not isinstance(self.task_kwargs, dict):
            raise ValueError(f"task_kwargs must be a dict, got {self.task_kwargs!r}")
        try:  # (a numpy value passed the task's checks, then the hash raised naming nothing)
            json.dumps(self.task_kwargs)
        except TypeError as e:
            raise ValueError(f"task_kwargs must hold plain Python values (they are hashed as JSON): {e}") from None
        try:
            task = self.make_task()
        except (TypeError, ValueError) as e:
            raise ValueError(f"task_kwargs {self.task_kwargs!r} do not fit task "
                             f"{self.task!r}: {e}") from e
        TinyConfig(task.tokenizer.vocab_size, self.d_model, self.n_layers, self.n_heads,
                   self.max_len, positions=self.positions)
        # Every task's sequences have one length: <bos>, prompt, answer, <eos>.
        length = task.sample(1, 0).input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"max_len={self.max_len} is shorter than the task's sequences "
                             f"(<bos> prompt answer <eos>: {length} tokens)")

    def make_task(self) -> tasks_module.Task:
        return _TASKS[self.task](**self.task_kwargs)

    def make_model(self) -> TinyCausalLM:
        vocab = self.make_task().tokenizer.vocab_size
        return TinyCausalLM(vocab, self.d_model, self.n_layers, self.n_heads, self.max_len,
                            positions=self.positions, seed=self.seed)

    def hash(self) -> str:
        """sha256 of the recipe's fields (without its name) and RECIPE_VERSION, 16 hex digits."""
        fields = dataclasses.asdict(self)
        fields.pop("name")
        if fields["label_smoothing"] == 0.0:  # added later: recipes without it keep their hash
            fields.pop("label_smoothing")
        blob = json.dumps({"version": RECIPE_VERSION, **fields}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


RECIPES: dict[str, Recipe] = {
    # d_model 128, 4 layers: the bar (>= 95 % held-out exact match on 3-digit addition).
    "base": Recipe(name="base"),
    "teacher": Recipe(name="teacher"),
    # Smaller (d_model 64, 2 layers); it reaches 100 % held out all the same, so distillation from
    # a weak start uses benchmarks/opd.py's recipes (a student on the plateau, brought to 12–36 %
    # by SFT on teacher samples). 1500 steps, as "base": at 600 it stopped on either side of the
    # loss plateau at 1.39 by machine and seed (6 % held out with seed 0 on an AMD EPYC, ~99 % on
    # the Xeon that wrote the README's example; seeds 1 and 2 at 1000 steps 3 % and 1 %, a newcomer
    # probe); at 1500 seeds 0–2 reached 100 %.
    "student": Recipe(name="student", d_model=64, n_layers=2, n_heads=4, steps=1500),
    # "base" trained with label smoothing 0.1: the same accuracy (100 % held out), but it keeps
    # log-prob ≈ log(0.1/V) on unseen answers, so a fine-tune elsewhere starts near 6 nats per
    # token instead of 16, as a pretrained LM would; the LoRA lr-ratio benchmark's base.
    "base-ls": Recipe(name="base-ls", label_smoothing=0.1),
    # the same at d_model 256, with half the lr (Adam's best lr falls like 1/width; at 3e-3 this
    # recipe reached 62 % held out in 1500 steps): the LoRA lr ratio's dependence on width
    "base-ls-256": Recipe(name="base-ls-256", d_model=256, lr=1.5e-3, label_smoothing=0.1),
    # and at d_model 512, the lr halved again by the same 1/width rule; 800 steps, not 1500
    # (a 1500-step run was at 100 % held out from step 1000 on, and each step costs ~4x d256's)
    "base-ls-512": Recipe(name="base-ls-512", d_model=512, steps=800, lr=7.5e-4,
                          label_smoothing=0.1),
}


def cache_dir() -> Path:
    """Where pretrained checkpoints live (see the module docstring). ``~`` is expanded (it was
    taken literally, relative to the working directory), and an XDG_CACHE_HOME that is relative
    after that is ignored, as the XDG spec says."""
    xdg = os.path.expanduser(os.environ.get("XDG_CACHE_HOME", ""))
    if os.environ.get("MODMAN_CACHE"):
        root = Path(os.path.expanduser(os.environ["MODMAN_CACHE"]))
    elif xdg and os.path.isabs(xdg):
        root = Path(xdg) / "modman"
    else:
        root = Path.home() / ".cache" / "modman"
    return root / "toy"


def _resolve(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be a Recipe or one of {sorted(RECIPES)}, got {recipe!r}")
    return RECIPES[recipe]


def checkpoint_path(recipe: str | Recipe, root: str | Path | None = None) -> Path:
    """``root/<name>-<hash>``; ``root`` defaults to :func:`cache_dir` (see the module docstring:
    an explicit root gets no ``toy`` folder appended)."""
    recipe = _resolve(recipe)
    return (Path(os.path.expanduser(root)) if root else cache_dir()) / f"{recipe.name}-{recipe.hash()}"


def learning_rate(step: int, recipe: Recipe) -> float:
    """Linear warm-up to ``lr`` over warmup_steps, then cosine decay to min_lr_ratio·lr."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    floor = recipe.min_lr_ratio
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(recipe: str | Recipe, *, progress: bool = False, eval_every: int = 0,
          time_limit: float | None = None, log=None) -> tuple[TinyCausalLM, dict]:
    """Train a model from scratch by ``recipe``; returns it and a metrics dict.

    ``eval_every`` > 0 records held-out accuracy along the way (costs generation time, reported
    as ``eval_seconds`` and included in ``train_seconds``), each record also passed to ``log``;
    ``time_limit`` (seconds) stops early — the result then depends on the machine, so such runs
    are never cached.
    """
    recipe = _resolve(recipe)
    task = recipe.make_task()
    model = recipe.make_model()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=recipe.betas)
    rng = np.random.default_rng(recipe.seed)
    history = []
    start = time.perf_counter()
    steps_done, eval_seconds = 0, 0.0
    iterator = range(recipe.steps)
    if progress:
        from tqdm.auto import tqdm  # (a widget in notebooks, as experiments/mnist1d.py's bars)
        iterator = tqdm(iterator, desc=f"pretrain {recipe.name}")
    model.train()
    for step in iterator:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        batch = task.sample(recipe.batch_size, rng, "train")
        loss = shifted_cross_entropy(model(batch.input_ids).logits, batch.labels,
                                     label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        steps_done = step + 1
        loss_value = loss.item()
        record = {"step": steps_done, "loss": loss_value,
                  "seconds": time.perf_counter() - start}
        if eval_every and steps_done % eval_every == 0:
            eval_start = time.perf_counter()
            record["test_accuracy"] = task.evaluate(model)
            eval_seconds += time.perf_counter() - eval_start
        if eval_every and (steps_done % eval_every == 0 or steps_done == 1):
            history.append(record)
            if log is not None:
                log(record)
        if progress:
            iterator.set_postfix(loss=f"{loss_value:.4f}")
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
    train_seconds = time.perf_counter() - start
    model.eval()
    accuracy = task.evaluate(model)
    metrics = {
        "recipe": recipe.name,
        "recipe_hash": recipe.hash(),
        "steps": steps_done,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "final_loss": loss_value,
        "test_accuracy": accuracy,
        "n_test": len(task.test_prompts()),
        "history": history,
    }
    return model, metrics


def pretrain(recipe: str | Recipe = "base", *, cache: str | Path | None = None,
             force: bool = False, progress: bool = True) -> TinyCausalLM:
    """The checkpoint of ``recipe`` (a name in :data:`RECIPES` or a :class:`Recipe`),
    trained on first use and loaded from the cache afterwards.

    ``cache`` is the folder that holds the checkpoint folders (``cache/<name>-<hash>``); the
    default is :func:`cache_dir`, which is ``$MODMAN_CACHE/toy`` when that variable is set.

    ``force=True`` retrains and overwrites. The metrics of the training run are in
    ``metrics.json`` beside the weights (see :func:`checkpoint_path`). ``progress``: a tqdm bar
    (stderr) while it trains — minutes on a CPU the first time (a silent first call looked hung).
    """
    recipe = _resolve(recipe)
    path = checkpoint_path(recipe, cache)
    if not force and path.is_dir():
        model = _cached(recipe, path)
        if model is not None:
            return model
    model, metrics = train(recipe, progress=progress)
    return store(recipe, model, metrics, cache)


def _cached(recipe: Recipe, path: Path) -> TinyCausalLM | None:
    """The checkpoint in ``path`` if it is ``recipe``'s; else None, with a warning saying why (the
    folder was loaded whenever it held a model.safetensors: an edited recipe.json or config.json,
    or a truncated file, was used or raised an error naming neither the file nor a way out)."""
    from .._warn import warn

    known = {f.name for f in dataclasses.fields(Recipe)}
    for attempt in range(3):
        try:
            saved = json.loads((path / "recipe.json").read_text())
            # fields this version does not know were added with hash-preserving defaults (the
            # folder's name is this recipe's hash): left out, not held against the folder
            if Recipe(**{k: v for k, v in saved.items() if k in known}).hash() != recipe.hash():
                raise ValueError("its recipe.json is another recipe's")
            model = TinyCausalLM.load(path)
            vocab = recipe.make_task().tokenizer.vocab_size
            if model.config != TinyConfig(vocab, recipe.d_model, recipe.n_layers, recipe.n_heads, recipe.max_len,
                                          positions=recipe.positions):
                raise ValueError("its config.json is not the recipe's architecture")
            return model
        except Exception as err:  # (JSON, safetensors, shape and validation errors alike: not usable)
            if not (path / "model.safetensors").is_file():
                reason = "it holds no model.safetensors"
            else:
                reason = f"{type(err).__name__}: {err}"
            if isinstance(err, OSError) and attempt < 2:
                time.sleep(1.0)  # another process may be replacing the folder (store): read it again
                continue
            warn(f"{path} does not hold recipe {recipe.name!r}'s checkpoint ({reason}); training it again")
            return None
    return None


def store(recipe: str | Recipe, model: TinyCausalLM, metrics: dict,
          cache: str | Path | None = None) -> TinyCausalLM:
    """Write a finished run of ``recipe`` into the cache (as :func:`pretrain` does) and return
    the stored model, loaded back."""
    recipe = _resolve(recipe)
    path = checkpoint_path(recipe, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename, so a crash or a concurrent reader never sees a
    # half-written checkpoint (between the two renames that replace an old folder a reader may find
    # it missing: one already reading it reads again; one arriving then trains it itself, as on first use).
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    model.save(tmp)
    (tmp / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    old = path.with_name(f"{path.name}.old{os.getpid()}-{time.time_ns()}")
    if path.exists():  # moved aside, not deleted first: the folder is missing for two renames only
        path.rename(old)
    try:
        tmp.rename(path)
    except OSError:  # another process stored the same recipe first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return TinyCausalLM.load(path)
