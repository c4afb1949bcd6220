"""Learning-rate schedules: a linear warmup from 0, then a cosine decay to 0 or a constant step size.

One function for every learner that warms its step size up (the LLM recipes follow Safe-RLHF's
``--lr_scheduler_type cosine --lr_warmup_ratio 0.03``)::

    optax.adamw(schedules.learning_rate_schedule(2e-5, total_steps, 0.03), ...)
"""

from __future__ import annotations

from typing import Literal

import optax

Decay = Literal["cosine", "constant"]


def learning_rate_schedule(peak: float, total_steps: int, warmup_ratio: float,
                           decay: Decay = "cosine") -> optax.Schedule:
    """The step size of update ``t`` (counted from 0) of ``total_steps``.

    The first ``warmup = int(warmup_ratio * total_steps)`` updates ramp linearly from 0 to ``peak``;
    then ``"cosine"`` decays to 0 at ``total_steps`` (at least one update after the warmup) and
    ``"constant"`` stays at ``peak`` (no warmup: ``peak`` throughout).
    """
    warmup = int(warmup_ratio * total_steps)
    if decay == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), max(total_steps, warmup + 1), 0.0)
    if decay != "constant":
        raise ValueError(f"decay must be 'cosine' or 'constant', got {decay!r}")
    if warmup <= 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
