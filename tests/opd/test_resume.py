"""Resuming a run: Trainer.state_dict() saved with torch.save and loaded into a new trainer
continues bit for bit; a state that does not fit is refused and changes nothing."""
import copy

import pytest
import torch

from modman import ManifoldMuon
from modman.opd import OPDConfig, Trainer
from modman.toy import tasks

from .helpers import tiny_model
from .test_guards import _assert_same, _snapshot

TASK = tasks.addition(1)
CONFIG = OPDConfig(prompts_per_step=4, group_size=2, eval_every=0, seed=3)
FACTORIES = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
    "manifold_muon": lambda m: ManifoldMuon(m.modules(), lr=0.05, solver="projected",
                                            budget="uniform", project_on_init=False,
                                            fallback=dict(lr=1e-2)),
}


def _trainer(name, config=CONFIG):
    return Trainer(tiny_model(0), TASK, config, teacher=tiny_model(1), optimizer=FACTORIES[name])


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_a_resumed_run_equals_the_uninterrupted_one(name, tmp_path):
    whole = _trainer(name)
    whole.train(6)

    first = _trainer(name)
    first.train(3)
    torch.save(first.state_dict(), tmp_path / "opd.pt")
    resumed = _trainer(name)  # fresh student: same init, its RNGs at the start
    resumed.load_state_dict(torch.load(tmp_path / "opd.pt"))
    assert resumed.step_count == 3
    resumed.train(3)

    for (k, a), b in zip(whole.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), k
    assert _without_time(resumed.history) == _without_time(whole.history)


def test_without_the_rng_states_the_run_differs():
    """The control: what the state adds is needed (a fresh trainer's RNGs redraw step 1's prompts)."""
    whole, first = _trainer("adamw"), _trainer("adamw")
    whole.train(4)
    first.train(2)
    state = first.state_dict()
    restarted = _trainer("adamw")
    restarted.load_state_dict({**state, "rng": restarted.rng.bit_generator.state,
                               "generator": restarted.generator.get_state()})
    restarted.train(2)
    assert not all(torch.equal(a, b) for a, b in zip(whole.student.parameters(),
                                                      restarted.student.parameters()))


def _state(**changes):
    trainer = _trainer("adamw")
    trainer.train(1)
    state = copy.deepcopy(trainer.state_dict())
    state.update(changes)
    return state


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["config"].update(seed=4), r"another config: seed 4 \(saved\) vs 3 \(here\)"),
    (lambda s: s["student"].update({"lm_head.weight": s["student"]["lm_head.weight"][:-1]}),
     r"state\['student'\]\['lm_head.weight'\] has shape"),
    (lambda s: s["student"]["lm_head.weight"].__setitem__((0, 0), float("nan")), "NaN or Inf"),
    (lambda s: s["student"].pop("lm_head.weight"), "trainable parameters differ"),
    (lambda s: s.update(rng={"bit_generator": "MT19937"}), "not generator states"),
    (lambda s: s["optimizer"]["param_groups"].append(dict(s["optimizer"]["param_groups"][0])),
     "parameter groups"),
    (lambda s: s.pop("history"), "lacks"),
    (lambda s: s.update(history=None), r"state\['history'\] must be a list"),  # (was checked after the changes)
    (lambda s: s["student"].update({"lm_head.weight": s["student"]["lm_head.weight"].double().fill_(1e300)}),
     r"NaN or Inf \(in torch.float32\)"),  # finite in fp64, inf once copied into the fp32 student
    (lambda s: next(iter(s["optimizer"]["state"].values()))["exp_avg"].fill_(float("nan")),
     r"state\['optimizer'\] holds NaN or Inf in 'exp_avg'"),  # torch's AdamW loads it unchecked
])
def test_a_state_that_does_not_fit_is_refused_and_changes_nothing(edit, message):
    state = _state()
    edit(state)
    trainer = _trainer("adamw")
    trainer.train(2)
    before = _snapshot(trainer), trainer.rng.bit_generator.state, trainer.generator.get_state()
    history = copy.deepcopy(trainer.history)
    with pytest.raises(ValueError, match=message):
        trainer.load_state_dict(state)
    _assert_same(_snapshot(trainer), before[0])
    assert trainer.rng.bit_generator.state == before[1]
    assert torch.equal(trainer.generator.get_state(), before[2])
    assert trainer.history == history


def test_the_state_is_a_snapshot_of_the_history_and_saves_with_numpy_hyperparameters(tmp_path):
    """A numpy kl_coef stayed a numpy scalar in the config, and torch.load (weights_only) refused
    the saved state; the history was the live list, so a state taken at step 1 held later records."""
    import numpy as np

    config = OPDConfig(prompts_per_step=4, group_size=2, eval_every=0, seed=3, kl_coef=np.float64(1.0),
                       discount=np.float32(0.0), clip_eps=np.float64(0.2))
    assert all(type(getattr(config, k)) is float for k in ("kl_coef", "discount", "clip_eps"))
    trainer = _trainer("adamw", config)
    trainer.train(1)
    state = trainer.state_dict()
    torch.save(state, tmp_path / "opd.pt")
    trainer.train(2)
    assert len(state["history"]) == 1
    resumed = _trainer("adamw", config)
    resumed.load_state_dict(torch.load(tmp_path / "opd.pt"))
    assert resumed.step_count == 1 and len(resumed.history) == 1
