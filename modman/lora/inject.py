"""Putting adapters into a model and managing them: apply, activate, disable, merge, unload.

``apply_lora`` replaces each targeted nn.Linear (in place, at the same path) by a
:class:`LoRALinear` wrapping it, freezes every base parameter, and makes the new adapter the
active and only trainable one. A model may carry several named adapters; ``set_adapter`` chooses
which are active (their outputs add) and trainable.
"""
from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from .._warn import warn
from ..optim.roles import is_expert_stack
from .config import LoRAConfig, select_targets
from .layer import LoRALinear, refuse_repeated

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_adapter_name(name: str) -> None:
    """Refuse, before anything changes, a name the adapter containers cannot hold."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in ("base_layer",):
        raise ValueError(f"adapter_name must be a Python identifier (no dots), got {name!r}")
    # the factors live in nn.ModuleDicts, whose add_module refuses a key that is an attribute: apply_lora
    # and load_adapter failed half-way, base frozen and layers swapped (a probe: "train", "eval", "keys")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"adapter_name {name!r} is an attribute of nn.ModuleDict, which holds the adapters' "
                         "factors; pick another name")


def _adapter_list(model: nn.Module, names: str | list[str]) -> list[str]:
    """``names`` (one name or a list) as a list, refused unless each is an adapter of the model,
    listed once."""
    names = [names] if isinstance(names, str) else list(names)
    refuse_repeated(names)
    present = adapter_names(model)
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"no adapter named {missing}; the model has {present}")
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear modules by path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def check_unmerged(model: nn.Module, where: str) -> None:
    """Refuse to train a model whose adapters are merged: merged factors are not in the forward
    pass, so backward failed with torch's "element 0 of tensors does not require grad"."""
    merged = sorted(path for path, layer in lora_layers(model).items() if layer.merged_adapters)
    if merged:
        raise ValueError(f"{where}: adapters are merged into the base weights of {merged[:3]}"
                         f"{' …' if len(merged) > 3 else ''}: their factors get no gradient; call "
                         "unmerge_lora(model) before training")


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present anywhere in the model, in order of creation."""
    names: list[str] = []
    for layer in lora_layers(model).values():
        for name in layer.r:
            if name not in names:
                names.append(name)
    return names


def _extent(p: torch.Tensor) -> tuple[int, int, int] | None:
    """(storage, first byte, end byte) of the memory p spans; None where it spans none that can be
    read: no entries (every empty tensor has data_ptr 0), the meta device, a tensor subclass without
    a plain storage (a DTensor's raised)."""
    if p.numel() == 0 or p.device.type == "meta":
        return None
    try:
        storage = p.untyped_storage().data_ptr()
    except RuntimeError:  # (a DTensor: "Attempted to access the data pointer on an invalid python storage")
        return None
    span = 1 + sum((size - 1) * stride for size, stride in zip(p.shape, p.stride()))
    return storage, p.data_ptr(), p.data_ptr() + span * p.element_size()


def _tied(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """For each named weight, the model's other parameters that are it or overlap its memory (an
    output head tied to the input embedding): merging s·B A into it would change them too."""
    params = [(name, p, _extent(p)) for name, p in model.named_parameters(remove_duplicate=False)]
    tied = {}
    for path, w in weights.items():
        mine, own = _extent(w), (f"{path}.weight", f"{path}.base_layer.weight")
        others = [name for name, p, theirs in params if name not in own and (
            p is w or (mine and theirs and mine[0] == theirs[0] and mine[1] < theirs[2] and theirs[1] < mine[2]))]
        if others:
            tied[path] = others
    return tied


def _refuse_tied_merge(model: nn.Module, layers: dict[str, LoRALinear], what: str) -> None:
    tied = _tied(model, {path: layer.base_layer.weight for path, layer in layers.items()})
    if tied:
        listed = "; ".join(f"{path} with {', '.join(others)}" for path, others in tied.items())
        raise ValueError(f"{what}: the base weight of {listed} is shared (tied): folding s·B A into it would "
                         "change the tied module too, so the merged model would not compute what the adapter "
                         "does. Keep the adapter unmerged (save_adapter stores it for PEFT), or untie the "
                         "weights first. Nothing was merged.")


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def apply_lora(model: nn.Module, config: LoRAConfig, adapter_name: str = "default", *,
               seed: int | None = None, allow_rank_above_layer: bool = False) -> nn.Module:
    """Add adapter ``adapter_name`` to the layers ``config`` targets; returns ``model``.

    Every base parameter is frozen (requires_grad=False); the new adapter becomes the active
    and only trainable one (others stay, inactive: see :func:`set_adapter`). ``seed`` makes the
    factors' initialisation independent of the global RNG. All checks (targets, ranks, name)
    run before the model is touched, so an error leaves it as it was. r above a target's
    min(d_in, d_out) is refused unless ``allow_rank_above_layer`` (see ``select_targets``).
    A preset (``"all-linear"``, …) adapts nn.Linear layers only: a mixture of experts' 3-D expert
    stacks get no adapter, with a warning naming them.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; pick another "
                         "adapter_name or load into it with load_adapter")
    targets = select_targets(model, config, allow_rank_above_layer=allow_rank_above_layer)
    if config.target_modules in ("all-linear", "mlp"):  # (the presets that would include the experts)
        stacks = [f"{path}.{attr}" if path else attr for path, module in model.named_modules()
                  for attr, p in module.named_parameters(recurse=False) if is_expert_stack(module, p)]
        if stacks:  # (transformers 5 stores Mixtral's experts as 3-D parameters: "all-linear" skipped them silently)
            warn(f"target_modules={config.target_modules!r} adapts nn.Linear layers only: {len(stacks)} expert "
                 f"stacks ({', '.join(stacks[:3])}{', …' if len(stacks) > 3 else ''}) get no adapter; LoRA on a "
                 "mixture of experts' experts needs PEFT's target_parameters, which modman.lora does not support")
    tied = _tied(model, {path: base.weight for path, base in targets.items()})
    if tied:  # (as PEFT warns for tied target modules)
        warn("; ".join(f"{path}'s weight is tied to {', '.join(others)}" for path, others in tied.items())
             + ": the adapter trains and saves as usual, but merge_lora and unload_lora(merge=True) will "
             "refuse these layers (merging would change the tied module too)")
    layers = lora_layers(model)
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    for param in model.parameters():
        param.requires_grad_(False)
    for path, base in targets.items():
        layer = layers.get(path)
        if layer is None:
            layer = LoRALinear(base)
            _set_submodule(model, path, layer)
        layer.add_adapter(adapter_name, config.r, config.scaling, config.dropout, config.init,
                          generator=generator)
    model.lora_configs = {**getattr(model, "lora_configs", {}), adapter_name: config}
    set_adapter(model, adapter_name)
    return model


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make ``names`` the active adapters (their updates add) and the only trainable ones.
    Merged adapters are unmerged first, with a warning (as PEFT does)."""
    names = _adapter_list(model, names)
    layers = lora_layers(model)
    merged = [path for path, layer in layers.items() if layer.merged_adapters]
    if merged:  # (it unmerged silently: the weights changed under a caller who had merged them)
        warn(f"setting the active adapters unmerges the adapters merged into {merged[:3]}"
             f"{' …' if len(merged) > 3 else ''} (as in PEFT); call merge_lora again to merge them")
    for layer in layers.values():
        layer.unmerge()
        layer.active_adapters = [n for n in names if n in layer.r]
        for name in layer.r:
            trainable = name in names
            layer.lora_A[name].weight.requires_grad_(trainable)
            layer.lora_B[name].weight.requires_grad_(trainable)


def disable_adapters(model: nn.Module) -> None:
    """Run the base model alone (merged adapters are unmerged first)."""
    for layer in lora_layers(model).values():
        layer.unmerge()
        layer.disabled = True


def enable_adapters(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.disabled = False


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """``with adapters_disabled(model):`` runs the base model, then puts every layer back as it
    was: adapters disabled before stay disabled, merged ones are merged again (W + s·B A
    recomputed, so equal up to the rounding of one unmerge and merge)."""
    before = {layer: (layer.disabled, list(layer.merged_adapters)) for layer in lora_layers(model).values()}
    disable_adapters(model)
    try:
        yield model
    finally:
        for layer, (disabled, merged) in before.items():
            layer.disabled = disabled
            layer.merge(merged)


def merge_lora(model: nn.Module, adapter_names: str | list[str] | None = None) -> nn.Module:
    """Fold s·B A into each base weight (fp32 arithmetic, then cast) for the given adapters
    (a name or a list; default: the active ones); the forward then skips them. Undo with
    :func:`unmerge_lora`. A merged model's ``state_dict()`` holds W + s·B A *and* the factors,
    and does not record the merge: load it only into a model merged the same way (as in PEFT),
    or unmerge before saving; loaded into an unmerged model it counts s·B A twice. A layer whose
    base weight is tied to another parameter (an lm_head sharing the input embedding) is refused
    before anything is merged: the merge would change the tied module too."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to merge")
    names = None if adapter_names is None else _adapter_list(model, adapter_names)
    chosen = {path: None if names is None else [n for n in names if n in layer.r] for path, layer in layers.items()}
    _refuse_tied_merge(model, {path: layer for path, layer in layers.items()
                               if layer.to_merge(chosen[path])}, "merge_lora")
    for path, layer in layers.items():
        # a layer merges the named adapters it carries (an adapter may target only some layers)
        layer.merge(chosen[path])
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract merged adapters from the base weights again (exact in fp32 up to rounding)."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by its base nn.Linear, merging the active adapters first when
    ``merge``; the result is a plain model (base parameters stay frozen). Merging refuses tied
    base weights as :func:`merge_lora` does, before anything changes."""
    if merge:
        layers = lora_layers(model)
        _refuse_tied_merge(model, {path: layer for path, layer in layers.items() if layer.to_merge()},
                           "unload_lora(merge=True)")
    for path, layer in lora_layers(model).items():
        if merge:
            layer.merge()
        _set_submodule(model, path, layer.base_layer)
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    return model


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """{``<path>.lora_A.weight`` / ``<path>.lora_B.weight``: tensor} for one adapter, the
    adapter name dropped from the key as in PEFT's files."""
    state = {}
    for path, layer in lora_layers(model).items():
        if adapter_name in layer.r:
            state[f"{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            state[f"{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
    if not state:
        raise ValueError(f"the model has no adapter named {adapter_name!r}; it has "
                         f"{adapter_names(model)}")
    return state


def adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs of the factors of one adapter (default: the trainable ones)."""
    out = []
    for name, param in model.named_parameters():
        parts = name.split(".")
        if len(parts) < 3 or parts[-3] not in ("lora_A", "lora_B"):
            continue
        if adapter_name is None and param.requires_grad or parts[-2] == adapter_name:
            out.append((name, param))
    return out
