"""On-policy distillation (Lu et al., Thinking Machines, 2025): the student samples, a fixed
teacher scores every sampled token, and −(log π_student − log π_teacher) is the per-token
advantage of an importance-sampling policy gradient. RL (sparse, group-centred reward) and SFT on
teacher samples run through the same loop for comparison.

    from modman.opd import OPDConfig, Trainer
    trainer = Trainer(student, task, OPDConfig(objective="opd"), teacher=teacher,
                      optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3))
    trainer.train(100)
"""
from .advantages import discounted_returns, group_centred_advantages, teacher_advantages
from .losses import importance_sampling_loss, ppo_clip_loss, sft_loss
from .rollouts import Rollouts, repeat_prompts, sample_rollouts
from .scoring import (check_same_vocabulary, completion_logprobs, gather_logprobs,
                      teacher_logprobs, vocab_size)
from .trainer import LOSSES, OBJECTIVES, OPDConfig, Trainer

__all__ = [
    "OPDConfig", "Trainer", "OBJECTIVES", "LOSSES", "Rollouts", "sample_rollouts",
    "repeat_prompts", "gather_logprobs", "completion_logprobs", "teacher_logprobs",
    "check_same_vocabulary", "vocab_size", "teacher_advantages", "group_centred_advantages",
    "discounted_returns", "importance_sampling_loss", "ppo_clip_loss", "sft_loss",
]
