"""Learning-rate schedules: warmup + cosine, and warmup-stable-decay (WSD).

Cosine fixes the run's length in advance: stopping early leaves a model that never had its low-LR phase.
WSD (MiniCPM, DeepSeek-LLM) holds the peak LR after warmup and decays only over the last `decay_fraction`
of the steps, linearly to lr * min_lr_ratio: a stable-phase checkpoint can be continued for longer, or
finished at any point by a short decay run of its own -- which is how the recipe's annealing stage works
(pretrain with decay_fraction 0, then anneal on task-shaped data with decay_fraction 1 and no warmup).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd")


def lr_at(step: int, cfg) -> float:
    """The learning rate for optimizer step `step` (0-based) under cfg.schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_steps = round(cfg.decay_fraction * cfg.max_steps)
        decay_start = max(cfg.warmup_steps, cfg.max_steps - decay_steps)
        if step < decay_start or cfg.max_steps <= decay_start:
            return cfg.lr
        progress = (step - decay_start + 1) / (cfg.max_steps - decay_start)
        return cfg.lr + (min_lr - cfg.lr) * min(1.0, progress)
    if cfg.schedule != "cosine":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)
