"""Toy models and tasks that train on a laptop CPU: a tiny Llama-style causal LM
(:class:`TinyCausalLM`), synthetic tasks with exact scorers (:mod:`modman.toy.tasks`), and a
cached few-minute pretraining recipe (:func:`pretrain`)."""
from . import tasks
from .model import (IGNORE_INDEX, CausalLMOutput, GenerationOutput, TinyCausalLM, TinyConfig,
                    shifted_cross_entropy)
from .pretrain import RECIPES, Recipe, cache_dir, checkpoint_path, pretrain, train
from .tasks import CharTokenizer

__all__ = [
    "TinyCausalLM", "TinyConfig", "CausalLMOutput", "GenerationOutput", "IGNORE_INDEX",
    "shifted_cross_entropy", "tasks", "CharTokenizer", "pretrain", "train", "Recipe", "RECIPES",
    "cache_dir", "checkpoint_path",
]
