"""LoRA for modman: adapters W + (α/r)·B A on nn.Linear layers, PEFT's file format, and a
small trainer that runs modman's optimizers (or AdamW) on the factors.

    model = apply_lora(model, LoRAConfig(r=16))               # all Linear layers but the head
    result = train(model, optimizer_factory("adamw", lora_lr(1e-4)), data, TrainConfig(200))
    save_adapter(model, "out/adapter")                        # loads in peft.PeftModel
"""
from .config import PRESETS, LoRAConfig, linear_modules, output_head, select_targets
from .inject import (adapter_names, adapter_parameters, adapter_state_dict, adapters_disabled,
                     apply_lora, disable_adapters, enable_adapters, lora_layers, merge_lora,
                     set_adapter, unload_lora, unmerge_lora)
from .layer import LoRALinear
from .optimizers import lora_param_groups, optimizer_factory
from .peft_format import load_adapter, read_adapter, save_adapter
from .rules import (capacity_bits, count_parameters, fits_capacity, lora_lr,
                    lora_parameter_count, rank_for_parameter_count)
from .trainer import TrainConfig, TrainResult, eval_loss_fn, lr_factor, task_data, train

__all__ = [
    "LoRAConfig", "PRESETS", "apply_lora", "LoRALinear", "select_targets", "linear_modules",
    "output_head", "lora_layers", "set_adapter", "adapter_names", "adapter_parameters", "adapter_state_dict",
    "disable_adapters", "enable_adapters", "adapters_disabled", "merge_lora", "unmerge_lora",
    "unload_lora", "save_adapter", "load_adapter", "read_adapter", "lora_param_groups",
    "optimizer_factory", "lora_lr", "lora_parameter_count", "rank_for_parameter_count",
    "count_parameters", "capacity_bits", "fits_capacity", "TrainConfig", "TrainResult", "train",
    "task_data", "eval_loss_fn", "lr_factor",
]
