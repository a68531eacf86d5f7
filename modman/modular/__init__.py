"""Modular norms and learning-rate budgets for ordinary torch.nn models (MATH.md §4).

    tree = from_torch(model)            # atoms, bonds and their composition
    tree.mass, tree.sensitivity, tree.norm({name: Δw})
    budget(model)                        # {parameter name: lr_scale}
    print(budget_table(model))
    ManifoldMuon(model.modules(), budget="modular")
"""
from .atoms import BiasAtom, EmbeddingAtom, GainAtom, MatrixAtom
from .bonds import ACTIVATION_SENSITIVITY, activation, attention, identity, normalize
from .budget import budget, budget_table
from .convert import ModularError, from_torch
from .declarations import declare
from .module import Atom, Bond, Compose, Module, Parallel, Placement, Scale, Tare, compose, repeat, tare

__all__ = ["from_torch", "budget", "budget_table", "declare", "ModularError", "Module", "Atom", "Bond",
           "Compose", "Parallel", "Scale", "Tare", "compose", "repeat", "tare", "Placement", "MatrixAtom", "EmbeddingAtom",
           "BiasAtom", "GainAtom", "activation", "identity", "normalize", "attention", "ACTIVATION_SENSITIVITY"]
