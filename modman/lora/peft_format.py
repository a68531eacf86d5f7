"""Adapters on disk in PEFT's format, the interchange format of the LoRA ecosystem.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Tensor keys are
``base_model.model.<module path>.lora_A.weight`` (r × d_in) and ``….lora_B.weight`` (d_out × r);
the in-memory adapter name is not part of the key. The config carries ``peft_type: "LORA"``,
``r``, ``lora_alpha`` (scale α/r, or α/√r with ``use_rslora``), ``target_modules`` and the other
LoraConfig fields PEFT reads. Module paths are those of the model object the adapter was applied
to, so an adapter saved from a transformers model loads with ``peft.PeftModel.from_pretrained``
on the same architecture, and an adapter PEFT saved loads here with :func:`load_adapter`.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from .._checks import is_finite_real
from .._warn import warn
from ..optim.roles import unwrap
from .config import ADAPTER_CONTAINERS, PRESETS, LoRAConfig, linear_modules, matches, select_targets
from .inject import adapter_names, adapter_state_dict, apply_lora, check_adapter_name, lora_layers
from .layer import adapter_dtype, features

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<path>.+)\.(?P<factor>lora_A|lora_B)\.weight")
# the base weight of an adapted layer: PEFT saves it when lm_head or an embedding is a target
# (save_embedding_layers), to be loaded into the base model
_BASE_KEY = re.compile(r"base_model\.model\.(?P<path>.+)\.base_layer\.weight")
_INIT_TO_PEFT = {"default": True, "gaussian": "gaussian", "random": False}
_INIT_FROM_PEFT = {True: "default", "gaussian": "gaussian", False: "random"}


def _target_list(paths: list[str], model: nn.Module) -> list[str] | str:
    """A ``target_modules`` that selects exactly ``paths`` by PEFT's rule, which matches every
    module of the model, not only its Linear layers (a key matches a name it equals or ends with
    as ".name"): the leaf names when they do (the familiar ["q_proj", …]), else the full paths
    (e.g. with exclusions), else a regex of the paths (PEFT fullmatches a string). Leaf names
    checked among the Linear layers alone were saved as ["0", "2"] for nn.Sequential MLPs ("0"
    also names ``layers.0``: PEFT refused the folder) and as ["proj"] beside a Conv2d
    ``patch_embed.proj`` (PEFT adapted it too; outputs 2.56e3 apart in a probe)."""
    names = [n for n, _ in model.named_modules()
             if n and not any(part in ADAPTER_CONTAINERS for part in n.split("."))]
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    for spec in (leaves, sorted(paths)):
        if {n for n in names if matches(spec, n)} == set(paths):
            return spec
    return "|".join(re.escape(p) for p in sorted(paths))


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", *,
                 base_model_name_or_path: str | None = None,
                 task_type: str | None = "auto") -> Path:
    """Write adapter ``adapter_name`` of ``model`` to the folder ``path`` in PEFT's format.

    ``task_type="auto"`` writes ``"CAUSAL_LM"`` for a model that generates the transformers way
    (it has ``prepare_inputs_for_generation``, which PEFT's causal-LM wrapper calls) and None
    otherwise, so that ``peft.PeftModel.from_pretrained`` loads the folder onto either. A
    ``torch.compile``-d model is saved under its eager module paths."""
    from safetensors.torch import save_file

    model = unwrap(model)
    if task_type == "auto":
        task_type = "CAUSAL_LM" if callable(getattr(model, "prepare_inputs_for_generation", None)) else None
    configs = getattr(model, "lora_configs", {})
    state = adapter_state_dict(model, adapter_name)
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} has tensors but no LoRAConfig on the model "
                         "(was it added by apply_lora or load_adapter?)")
    config: LoRAConfig = configs[adapter_name]
    paths = sorted({key.rsplit(".", 2)[0] for key in state})
    if base_model_name_or_path is None:
        hf_config = getattr(model, "config", None)
        base_model_name_or_path = getattr(hf_config, "name_or_path", None) or None
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "bias": "none",
        # transformers' Conv1D (GPT-2) stores W as (in, out); PEFT reads this flag for such layers
        "fan_in_fan_out": any(lora_layers(model)[p].fan_in_fan_out for p in paths),
        "target_modules": _target_list(paths, model),
        "exclude_modules": None,
        "init_lora_weights": _INIT_TO_PEFT[config.init],
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
    }
    tensors = {PREFIX + key: t.detach().contiguous().cpu() for key, t in state.items()}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    # Write beside and rename, so a reader never sees half a file.
    tmp_weights = folder / f".{WEIGHTS_NAME}.tmp{os.getpid()}"
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    tmp_weights.replace(folder / WEIGHTS_NAME)
    tmp_config = folder / f".{CONFIG_NAME}.tmp{os.getpid()}"
    tmp_config.write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    tmp_config.replace(folder / CONFIG_NAME)
    return folder


def _base_path(key: str) -> str | None:
    """The module path of a ``…<path>.base_layer.weight`` key, else None."""
    match = _BASE_KEY.fullmatch(key)
    return match["path"] if match else None


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config dict and tensors of a PEFT LoRA folder, validated; nothing is applied."""
    from safetensors.torch import load_file

    folder = Path(path)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            pickled = file == weights_file and (folder / "adapter_model.bin").is_file()
            raise FileNotFoundError(f"{file} not found (a PEFT adapter folder holds {CONFIG_NAME} "
                                    f"and {WEIGHTS_NAME})" + (
                                        "; the folder has adapter_model.bin, PEFT's older pickle format, which "
                                        "modman.lora does not read (unpickling can run code): save it again with "
                                        "PEFT's save_pretrained(safe_serialization=True)" if pickled else ""))
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} holds a JSON {type(config).__name__}, not the object of a LoraConfig")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") not in ("none", None),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "lora_bias": bool(config.get("lora_bias")),
        "target_parameters": bool(config.get("target_parameters")),
        # activated LoRA adapts only the tokens from its invocation sequence on: loaded as plain
        # LoRA it ran on every token (logits 0.37 from PEFT's in a probe); set as PEFT reads it, truthy
        "alora_invocation_tokens": bool(config.get("alora_invocation_tokens")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{config_file}: {bad} not supported by modman.lora (plain LoRA on "
                         "nn.Linear or Conv1D with one rank and alpha only)")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not is_finite_real(value) or not value > 0:
            raise ValueError(f"{config_file}: {key} must be a positive number, got {value!r}")
    if float(config["r"]) != int(config["r"]):
        raise ValueError(f"{config_file}: r must be a whole number, got {config['r']!r}")
    dropout = config.get("lora_dropout")  # (LoRAConfig's own message named no file)
    if dropout is not None and not (is_finite_real(dropout) and 0 <= dropout < 1):
        raise ValueError(f"{config_file}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    try:
        tensors = load_file(str(weights_file))
    except Exception as err:  # safetensors raises its own SafetensorError for a damaged file
        raise ValueError(f"{weights_file} is not a readable safetensors file: {err}") from None
    if not tensors:
        raise ValueError(f"{weights_file} holds no tensors")
    adapted = {m["path"] for m in map(_KEY.fullmatch, tensors) if m}
    wrong = [k for k in tensors if not _KEY.fullmatch(k) and _base_path(k) not in adapted]
    if wrong:
        raise ValueError(f"{weights_file}: keys not of the form base_model.model.<path>."
                         f"lora_A|lora_B.weight (or the base_layer.weight PEFT saves with an adapted "
                         f"lm_head or embedding): {wrong[:5]}")
    # integer or bool factors are no LoRA weights (an int64 file loaded as rounded values, silently)
    integral = [f"{k} ({str(t.dtype).removeprefix('torch.')})" for k, t in tensors.items() if not t.is_floating_point()]
    if integral:
        raise ValueError(f"{weights_file}: LoRA factors must be floating point, got {sorted(integral)[:5]}")
    # a damaged file can keep its header and carry NaN/inf in its data: loading it would put
    # them into the model
    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{weights_file}: non-finite values in {sorted(bad)[:5]}")
    # the folder against itself before the model: lora_A is (r, d_in), lora_B (d_out, r)
    r, off = int(config["r"]), []
    for key, t in sorted(tensors.items()):
        if not _KEY.fullmatch(key):
            continue  # a base weight: checked against the model by load_adapter
        if t.ndim != 2:
            off.append(f"{key} ({t.ndim}-D)")
        elif t.shape[0 if _KEY.fullmatch(key)["factor"] == "lora_A" else 1] != r:
            off.append(f"{key} of shape {tuple(t.shape)}")
    if off:
        raise ValueError(f"{weights_file} does not match {config_file}, which says r={r}: {off[:5]}")
    return config, tensors


def _config_disagreements(model: nn.Module, config: dict, paths: set[str]) -> list[str]:
    """Where the file's weights and its config's ``target_modules`` name different modules: PEFT
    places adapters by the config (and ignores other weights), modman by the weights, so the two
    would give different models (a probe: 14 adapted layers here, 2 in PEFT, logits 0.56 apart).
    Checked when the config's selection is plain (no exclude_modules / layers_to_transform)."""
    spec = config.get("target_modules")
    if (not spec or spec in PRESETS or config.get("exclude_modules") or config.get("layers_to_transform") is not None
            or config.get("layers_pattern")):
        return []
    if isinstance(spec, (list, tuple, set)):
        spec = sorted(spec)
    try:
        targeted = set(select_targets(model, LoRAConfig(r=1, target_modules=spec), allow_rank_above_layer=True))
    except ValueError as err:
        if "matches no nn.Linear" in str(err):  # PEFT refuses it too (NoMatchingPeftModuleError)
            return [f"its config's target_modules={spec!r} selects no Linear here"]
        return []  # a selection modman refuses for its own reasons: nothing to compare (the weights decide)
    except TypeError:
        return []
    out = []
    if paths - targeted:
        out.append(f"weights for modules its config's target_modules={spec!r} does not select "
                   f"({sorted(paths - targeted)[:5]}: PEFT would leave them out)")
    if targeted - paths:
        out.append(f"its config's target_modules={spec!r} selects modules it holds no weights for "
                   f"({sorted(targeted - paths)[:5]})")
    return out


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default"
                 ) -> nn.Module:
    """Load the PEFT adapter at ``path`` into ``model`` as ``adapter_name``; returns ``model``.

    The adapted modules are those named in the tensor file. If the model has no adapter of that
    name it is created (and made active and trainable, as by :func:`apply_lora`); otherwise its
    values are overwritten, which needs the file's rank and scale (r, lora_alpha, use_rslora) to
    be the adapter's; where it was merged it is merged again with the new values (the other
    adapters merged into its layers too, W recomputed: equal up to the rounding of one unmerge and
    merge). Every module path and shape is checked first: an adapter for
    other module names or shapes raises ValueError naming the file and modules, and the model
    is left untouched.
    """
    model = unwrap(model)
    check_adapter_name(adapter_name)
    config, tensors = read_adapter(path)
    weights_file = Path(path) / WEIGHTS_NAME
    factors: dict[str, dict[str, torch.Tensor]] = {}
    bases: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match:
            factors.setdefault(match["path"], {})[match["factor"]] = tensor
        else:
            bases[_base_path(key)] = tensor
    r = int(config["r"])
    linears, layers = linear_modules(model), lora_layers(model)
    problems = []
    for module_path, pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"}:
            problems.append(f"{module_path}: has {sorted(pair)} only")
            continue
        if module_path not in linears:
            problems.append(f"{module_path}: no nn.Linear (or Conv1D) of that path in the model")
            continue
        base = linears[module_path]
        d_in, d_out = features(base)
        expect = {"lora_A": (r, d_in), "lora_B": (d_out, r)}
        layer = layers.get(module_path)
        dtype = (layer.lora_A[adapter_name].weight.dtype if layer is not None and adapter_name in layer.r
                 else adapter_dtype(base.weight.dtype))
        for factor, shape in expect.items():
            if tuple(pair[factor].shape) != shape:
                problems.append(f"{module_path}.{factor}: shape {tuple(pair[factor].shape)}, "
                                f"the model needs {shape}")
            elif not bool(torch.isfinite(pair[factor].to(dtype)).all()):  # (fp64 1e300 loaded as inf into fp32)
                problems.append(f"{module_path}.{factor}: values overflow the adapter's "
                                f"{str(dtype).removeprefix('torch.')}")
    for module_path, saved in bases.items():
        # PEFT would load it into the base model; modman.lora loads factors only, so it must be
        # the model's own weight already (it is when the adapter was trained on this base)
        base = linears.get(module_path)
        if base is None:
            continue  # (reported with the factors)
        weight = base.weight.detach()
        if tuple(saved.shape) != tuple(weight.shape):
            differs = f"its shape {tuple(saved.shape)} is not the model's {tuple(weight.shape)}"
        else:  # compared in the narrower dtype: a bf16 copy of the model's fp32 weight is the model's
            narrow = min(saved.dtype, weight.dtype, key=lambda dt: torch.finfo(dt).bits)
            same = torch.equal(saved.to(device=weight.device, dtype=narrow), weight.to(narrow))
            differs = None if same else "its values are not the model's"
        if differs:
            problems.append(f"{module_path}: the file also holds this layer's base weight (PEFT saves it for an "
                            f"adapted lm_head or embedding), and {differs}: saved from another base model "
                            "or a resized vocabulary; modman.lora loads LoRA factors only")
    problems += _config_disagreements(model, config, set(factors))
    existing = adapter_name in adapter_names(model)
    if existing and not problems:
        have = {p: layer for p, layer in lora_layers(model).items() if adapter_name in layer.r}
        if set(have) != set(factors):
            problems.append(f"adapter {adapter_name!r} already exists on other modules "
                            f"({sorted(set(have) ^ set(factors))[:5]} differ)")
        # loading overwrites the factors only: a rank or scale of the file that differs from the
        # adapter's would give other outputs than the saved model's (or broadcast a rank-1 file)
        file_scaling = LoRAConfig(r=r, alpha=config["lora_alpha"], use_rslora=bool(config.get("use_rslora"))).scaling
        for module_path, layer in have.items():
            if layer.r[adapter_name] != r or not math.isclose(layer.scaling[adapter_name], file_scaling,
                                                              rel_tol=1e-12):
                problems.append(f"adapter {adapter_name!r} has r={layer.r[adapter_name]}, scale "
                                f"{layer.scaling[adapter_name]:g} on {module_path}, the file r={r}, "
                                f"lora_alpha={config['lora_alpha']!r}, use_rslora="
                                f"{bool(config.get('use_rslora'))} (scale {file_scaling:g}); load it "
                                "under another adapter_name")
                break
    if problems:
        listing = "; ".join(problems[:10]) + ("; …" if len(problems) > 10 else "")
        raise ValueError(f"{weights_file} does not fit {type(model).__name__}: {listing}. "
                         "The model was not changed.")
    if not existing:
        init = config.get("init_lora_weights", True)
        known = _INIT_FROM_PEFT.get(init) if isinstance(init, (bool, str)) else None
        if known is None:
            warn(f"{Path(path) / CONFIG_NAME}: init_lora_weights={init!r} is not an initialisation modman.lora "
                 "knows: the factors are loaded as saved, and save_adapter will write init_lora_weights=true "
                 "(an initialisation that changes the base weights, such as PiSSA or OLoRA, also needs the "
                 "base model it converted)")
        targets = "|".join(re.escape(p) for p in sorted(factors))
        lora_config = LoRAConfig(
            r=r, alpha=config["lora_alpha"], target_modules=f"(?:{targets})",
            dropout=float(config.get("lora_dropout") or 0.0),
            use_rslora=bool(config.get("use_rslora")),
            init=known or "default")
        apply_lora(model, lora_config, adapter_name, allow_rank_above_layer=True)
    layers = lora_layers(model)
    with torch.no_grad():
        for module_path, pair in factors.items():
            layer = layers[module_path]
            # the merged values are about to change: unmerge (which unmerges every adapter of the
            # layer) and merge the same adapters again after; leaving them unmerged changed the
            # model's output (0.059 in a probe)
            merged = list(layer.merged_adapters) if adapter_name in layer.merged_adapters else []
            if merged:
                layer.unmerge()
            for factor in ("lora_A", "lora_B"):
                weight = getattr(layer, factor)[adapter_name].weight
                weight.copy_(pair[factor].to(device=weight.device, dtype=weight.dtype))
            layer.merge(merged)
    return model
