"""torch.compile around a prepared model (or prepared after compiling): the same results as eager, and
no recompilation from step to step. backend="aot_eager" runs dynamo and AOTAutograd (the graph capture
and the joint forward/backward) without generating kernels, so results are bitwise comparable and the
test stays fast; inductor is measured in benchmarks/bench_compile.py."""

from __future__ import annotations

import pytest
import torch

import mixprec as mp

POLICIES = ["f32", "f16-master", "f16-master,execution=native", "bf16-master"]


class Block(torch.nn.Module):
    """LayerNorm, self-attention and dropout: what a transformer layer brings to a compiled graph."""

    def __init__(self, width: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(8, width)
        self.norm = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, num_heads=2, dropout=dropout, batch_first=True)
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(x))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.drop(h + a)).mean(dim=1)


def _train(policy: str, compile_when: str | None, steps: int = 4) -> tuple[list, list[float]]:
    torch.manual_seed(0)
    model = Block()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if compile_when == "before":
        model = torch.compile(model, backend="aot_eager")
    model, opt, scaler = mp.prepare(model, opt, policy + ("" if policy == "f32" else ",scaling=dynamic:1024"))
    if compile_when == "after":
        model = torch.compile(model, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        x, y = torch.randn(4, 6, 8, generator=g), torch.randn(4, 1, generator=g)
        # After the first step (which compiles), a recompilation would be a failure.
        with torch._dynamo.config.patch(error_on_recompile=step > 0 and compile_when is not None):
            with mp.autocast(model):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
        info = mp.step(opt, scaler, max_grad_norm=1.0)
        assert info.applied
        opt.zero_grad()
        losses.append(loss.item())
    return [p.detach().clone() for p in mp.distributed.unwrap(model).parameters()], losses


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("compile_when", ["after", "before"])
def test_compiled_training_equals_eager(policy, compile_when):
    torch._dynamo.reset()
    eager_params, eager_losses = _train(policy, None)
    compiled_params, compiled_losses = _train(policy, compile_when)
    assert compiled_losses == eager_losses
    for a, b in zip(compiled_params, eager_params, strict=True):
        assert torch.equal(a, b)


def test_dropout_trains_under_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block(dropout=0.1)
    model, opt, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "f16-master")
    model = torch.compile(model, backend="aot_eager")
    with mp.autocast(model):
        loss = model(torch.randn(2, 6, 8)).float().pow(2).mean()
    scaler.scale(loss).backward()
    assert mp.step(opt, scaler).applied
