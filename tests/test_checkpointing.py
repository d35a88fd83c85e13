"""Activation checkpointing (torch.utils.checkpoint, Hugging Face's gradient_checkpointing_enable) under a
policy: the forward that backward recomputes runs as it ran inside mp.autocast, so a checkpointed model
trains bit for bit as the same model without checkpointing, natively and emulated.

torch.utils.checkpoint restores torch.autocast for the recomputation, not mixprec's hooks (FP32 islands,
parameter casts, per-op emulation's FP32 arithmetic): without the hooks that prepare keeps for it, the
recomputed tensors have other dtypes (torch raises CheckpointError) or other values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import mixprec as mp

pytestmark = pytest.mark.usefixtures("one_thread")

POLICIES = ["f16-master", "bf16-master", "f16-master,execution=native", "bf16-master,execution=native",
            "f16-mixed,execution=native", "bf16-mixed", "f16-master,execution=emulated-module",
            "params=f16,compute=e4m3,output=f32,master=f32,scaling=dynamic"]


class Block(torch.nn.Module):
    """Linear, an FP32 island (LayerNorm), attention computed in the block's own forward (no parameters
    of its own there: per-op emulation must still give it FP32 arithmetic), a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm, self.down = torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.up(x))
        q = h.view(x.shape[0], x.shape[1], 2, 16).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(h.shape)
        return x + self.down(F.gelu(a @ torch.eye(32, dtype=a.dtype)))


class Net(torch.nn.Module):
    def __init__(self, checkpointing: str | None) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block() for _ in range(2)])
        self.head = torch.nn.Linear(16, 1)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointing is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.checkpointing == "reentrant")
        return self.head(x)


def train(policy: str, checkpointing: str | None, steps: int = 4) -> tuple[list, list, list]:
    torch.manual_seed(0)
    model = Net(checkpointing)
    model, opt, scaler = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), policy)
    losses, applied = [], []
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(4, 6, 16, generator=g, requires_grad=True), torch.randn(4, 6, 1, generator=g)
        with mp.autocast(model):
            loss = F.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()  # outside the block, as usual: the recomputation happens here
        applied.append(mp.step(opt, scaler, max_grad_norm=1.0).applied)
        opt.zero_grad()
        losses.append(loss.item())
    return [p.detach().clone() for p in model.parameters()], losses, applied


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("policy", POLICIES)
def test_a_checkpointed_model_trains_bit_for_bit_as_without_checkpointing(policy, checkpointing):
    params, losses, applied = train(policy, checkpointing)
    ref_params, ref_losses, ref_applied = train(policy, None)
    assert applied == ref_applied and any(applied)
    assert losses == ref_losses
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params, strict=True))


def test_without_the_recompute_hooks_the_recomputation_differs():
    # The negative control: the same model, with the hooks prepare keeps removed, fails as before the fix.
    torch.manual_seed(0)
    model = Net("non-reentrant")
    model, opt, scaler = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), "f16-master")
    state = mp.prepared_state(model)
    kept = len(state.handles)
    for handle in state.handles:
        handle.remove()
    assert kept > 0
    with mp.autocast(model):
        loss = F.mse_loss(model(torch.randn(4, 6, 16)).float(), torch.zeros(4, 6, 1))
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different metadata"):
        scaler.scale(loss).backward()


def test_the_recompute_hooks_do_nothing_in_forward_and_unprepare_removes_them():
    model = Net(None)
    counts = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    mp.prepare(model, None, "f16-master")
    x = torch.randn(2, 6, 16)
    out = model(x)  # outside mp.autocast, not in backward: FP32 arithmetic on the rounded parameters
    assert out.dtype == torch.float32
    with torch.no_grad():
        expected = model.head(model.blocks[1](model.blocks[0](x)))
    assert torch.equal(out, expected)
    mp.unprepare(model)
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == counts


@pytest.mark.parametrize("policy", ["f16-master", "f16-master,execution=native"])
def test_hugging_face_gradient_checkpointing_trains_as_without_it(policy):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, use_cache=False)
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
        if checkpointing:  # transformers 5 renamed it; older ones have only gradient_checkpointing_enable
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.train()
        model, opt, scaler = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3), policy)
        losses = []
        for i in range(3):
            ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i))
            with mp.autocast(model):
                loss = model(input_ids=ids, labels=ids).loss  # the loss computed inside forward
            scaler.scale(loss).backward()
            mp.step(opt, scaler, max_grad_norm=1.0)
            model.zero_grad()
            losses.append(loss.item())
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


@pytest.mark.parametrize("policy", ["f16-master", "f16-master,execution=native"])
def test_checkpointing_under_torch_compile_trains_as_eager_without_it(policy):
    # The kept hooks return before anything dynamo cannot trace; recomputation inside the compiled graph.
    def run(checkpointing: str | None, compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = Net(checkpointing)
        model, opt, scaler = mp.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), policy)
        model = torch.compile(model, backend="aot_eager") if compiled else model
        for i in range(3):
            g = torch.Generator().manual_seed(i)
            x, y = torch.randn(4, 6, 16, generator=g), torch.randn(4, 6, 1, generator=g)
            with mp.autocast(model):
                loss = F.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            mp.step(opt, scaler)
            opt.zero_grad()
        return [p.detach().clone() for p in opt.model_params]

    torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(run("non-reentrant", True), run(None, False), strict=True))


@pytest.mark.parametrize("policy", ["f16-master", "f16-master,execution=native"])
def test_a_prepared_model_still_pickles_and_deep_copies(policy):
    # torch.save(model) (the whole module) and copy.deepcopy (an EMA, a teacher) copy the kept hooks too:
    # the copies' do nothing (the state they gate on is the original's), and the copies run as it does.
    import copy
    import io

    model = Net(None)
    mp.prepare(model, None, policy)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [torch.load(buffer, weights_only=False), copy.deepcopy(model)]
    x = torch.randn(2, 6, 16)
    with torch.no_grad(), mp.autocast(model):
        expected = model(x)
    for other in copies:
        with torch.no_grad(), mp.autocast(other):
            assert torch.equal(other(x), expected)
