"""FP8 training: Linear layers whose matmuls run on scaled E4M3/E5M2 operands (see docs/fp8.md).

* `recipe`: `Fp8Recipe`, how the operands are scaled (tensorwise, delayed, rowwise, blockwise, mx);
* `scales`: the scales of each granularity and the saturating cast onto FP8 (torchao's rules);
* `linear`: the FP8 matmuls forward and backward (`fp8_linear`), one layer's scaling state (`Fp8Layer`);
* `install`: what `mp.prepare` does with them: FP8 forwards for the chosen Linears, histories in checkpoints.

A policy turns them on: ``mp.Policy.parse("fp8-tensorwise")`` or ``"bf16-master,fp8=rowwise"``.
"""
