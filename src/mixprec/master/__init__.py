"""FP32 master weights for any torch optimizer.

An update smaller than 2^-11 of its weight is lost when it is added in FP16 (half an FP16 ulp); over
many steps those lost updates are the difference between training and stalling. `MasterWeights` keeps
an FP32 copy of every 16-bit parameter, lets the wrapped optimizer step the copies, and rounds the
result back into the model's parameters for the next forward/backward (Micikevicius et al., 2018).

How it fits together:

* The wrapped optimizer's param groups are pointed at the FP32 masters, so its state (Adam moments,
  step counters) is FP32 and attached to the masters; LR schedulers attach to the `MasterWeights`
  (a `torch.optim.Optimizer`), whose ``param_groups`` *are* the inner optimizer's.
* Gradients live where PyTorch puts them: each 16-bit parameter's ``.grad`` is 16-bit, read and
  cleared as usual (``model.zero_grad()``, clipping, DDP); the master holds the same gradient in FP32,
  accumulated in FP32 across micro-batches, and the step consumes it (``release_grads_``). How the two
  stay one gradient: `mixprec.gradients`; what it costs: docs/distributed.md.
* The masters follow the model's weights the same way: before each update a master is kept only
  where it still rounds to its parameter, so weights written after prepare (``load_state_dict``,
  DDP's broadcast of rank 0's weights) are what the optimizer continues from.
* The master -> model copy is one ``torch._foreach_copy_`` per (device, dtype) group.

Files: ``weights.py`` (this class), one file per mode (``fp32.py``, ``direct.py`` for "none"; a new mode
such as compact / kahan / stochastic goes beside them), ``checkpoint.py`` (the state dict's checks),
``live.py`` (which parameters a live MasterWeights manages).

Modes (a string per param group):

* ``"fp32"``: FP32 masters for every 16-bit (or emulated) parameter. FP32 parameters (e.g. FP32
  islands such as norms) are their own masters: no copy.
* ``"none"``: no masters; the optimizer steps the 16-bit parameters directly (the paper's "without
  master weights" ablation). With emulation, parameters are rounded back onto the grid after each step.

A param group of the inner optimizer may carry a ``"master_mode"`` key to override ``mode`` for that
group.

Emulation: with ``param_format`` (a `mixprec.Format`), float32 parameters are taken to hold values on
that format's grid (e.g. FP16 values in FP32 storage, as the paper emulated FP16). Incoming gradients
are rounded onto the format first (a real 16-bit parameter's gradient is 16-bit), masters are rounded
back with `mixprec.quantize`. The emulated copy-back runs per tensor: emulation is for studying the
numerics on any machine, not the fast path.
"""

from __future__ import annotations

from .checkpoint import STATE_VERSION
from .live import live_owners, managed
from .modes import MODES
from .weights import MasterWeights

__all__ = ["MasterWeights", "MODES", "managed", "live_owners", "STATE_VERSION"]
