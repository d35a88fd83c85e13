"""How a policy runs on a model: one module per execution mode, and the hooks they share.

* `native`: the device's own 16-bit dtypes (torch.autocast, parameters cast in place, FP32 islands);
* `emulated`: torch.autocast's per-op rules with each format's carrier dtype, FP32 arithmetic for
  matmuls and convolutions, values rounded onto formats narrower than their carrier (FP8, custom);
* `emulated_module`: the fallback for formats no 16-bit dtype carries the rules of: values rounded at
  module boundaries (``execution=emulated-module``), coarser than per op;
* `hooks`: the toolkit the three share (gated hooks, rounding with a straight-through gradient,
  parameter swaps while a module runs, mapping over nested outputs).

`mixprec.apply` (`mp.prepare`, `mp.autocast`) chooses the mode and installs it. See docs/architecture.md.
"""
