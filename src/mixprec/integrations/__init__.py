"""mixprec inside other training frameworks, one line each (optional extras, imported lazily).

* `mixprec.integrations.lightning` - a Lightning precision plugin (``pip install "mixprec[lightning]"``);
* `mixprec.integrations.hf` - Hugging Face Trainer and Accelerate (``pip install "mixprec[hf]"``).

``import mixprec`` imports none of these; importing one of them needs its framework installed.
Every integration logs the same keys after an optimizer step (`step_logs`): ``mixprec/loss_scale``,
``mixprec/skipped_steps`` (a running total) and ``mixprec/grad_norm`` (the unscaled norm, when clipping).
See docs/integrations.md.

Example:
    >>> import mixprec as mp
    >>> step_logs(mp.StepInfo(applied=True, loss_scale=1024.0, grad_norm=0.5, skipped_steps=2))
    {'mixprec/loss_scale': 1024.0, 'mixprec/skipped_steps': 2.0, 'mixprec/grad_norm': 0.5}
"""

from __future__ import annotations

from typing import Any

__all__ = ["LOG_PREFIX", "step_logs"]

#: The prefix of every key the integrations log.
LOG_PREFIX = "mixprec/"


def step_logs(info: Any) -> dict[str, float]:
    """The values an integration logs after a step, from its `mixprec.StepInfo` (read on the host)."""
    logs = {f"{LOG_PREFIX}loss_scale": float(info.loss_scale), f"{LOG_PREFIX}skipped_steps": float(info.skipped_steps)}
    if info.grad_norm is not None:
        logs[f"{LOG_PREFIX}grad_norm"] = float(info.grad_norm)
    return logs
