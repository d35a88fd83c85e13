"""Real model code nobody here wrote, unchanged, under f16-master (emulated on CPU) vs FP32.

transformers' GPT-2 and BERT from tiny configs (no download), a CNN with BatchNorm on scikit-learn's
bundled digits, and nn.LSTM; each trained for a few steps with the README's training loop.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec as mp
from mixprec import prepared_state

transformers = pytest.importorskip("transformers")

STEPS = 25


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

Task = tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]


def gpt2() -> Task:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(1))

    def loss(model: nn.Module) -> torch.Tensor:
        logits = model(ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, 100), ids[:, 1:].reshape(-1))

    return model, loss


def bert() -> Task:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 100, (16, 12), generator=g), torch.randint(0, 3, (16,), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0  # padding: BERT's additive mask goes through the emulation too
    return model, lambda model: F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)


def cnn() -> Task:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10),
    )
    digits = load_digits()
    x = torch.tensor(digits.images[:128], dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target[:128])
    return model, lambda model: F.cross_entropy(model(x), y)


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def lstm() -> Task:
    torch.manual_seed(0)
    x = torch.randn(32, 10, 6, generator=torch.Generator().manual_seed(1))
    y = 0.3 * x[:, :, 0].sum(1, keepdim=True)
    return Recurrent(), lambda model: F.mse_loss(model(x), y)


MODELS = {"gpt2": gpt2, "bert": bert, "cnn": cnn, "lstm": lstm}


def train(make: Callable[[], Task], policy: str) -> tuple[list[float], nn.Module, torch.optim.Optimizer]:
    """The README's training loop, unchanged for every model and policy."""
    model, loss_fn = make()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model, optimizer, scaler = mp.prepare(model, optimizer, policy)
    losses = []
    for _ in range(STEPS):
        with mp.autocast(model, policy):
            loss = loss_fn(model)
        scaler.scale(loss).backward()
        info = mp.step(optimizer, scaler, max_grad_norm=1.0)
        assert info.applied  # no overflow at 2^16 on these small models
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model, optimizer


@pytest.mark.parametrize("name", MODELS)
def test_f16_master_emulated_tracks_fp32(name):
    reference, _, _ = train(MODELS[name], "f32")
    losses, model, optimizer = train(MODELS[name], "f16-master")
    assert prepared_state(model).execution == "emulated"
    assert type(optimizer).__name__ == "MasterWeights" or isinstance(optimizer, mp.MasterWeights)
    assert reference[-1] < 0.9 * reference[0]  # the reference run learns something
    assert losses != reference  # and the emulation did change the numbers ...
    # ... by little: FP16 rounds each stored value by at most 2^-11 relative; over 25 steps of Adam those
    # perturbations shift the loss by ~1e-4 relative here (measured); 1% leaves room while still
    # failing on any real mistake (a wrong format, a lost gradient, an unrounded/garbled master).
    worst = max(abs(a - b) / abs(a) for a, b in zip(reference, losses, strict=True))
    assert worst < 1e-2, f"{name}: f16-master's loss drifts {worst:.2e} from FP32's"
    for pname, p in model.named_parameters():  # the parameters the model computes with are FP16 values
        fmt = prepared_state(model).param_formats.get(pname)
        if fmt == mp.F16:
            assert torch.equal(p, mp.quantize(p, mp.F16)), pname


def rows(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split(None, 6) for line in text.splitlines()[2:]}


def test_explain_gpt2():
    model, _ = gpt2()
    text = mp.Policy.parse("f16-master").explain(model)
    assert text.splitlines()[0].startswith("policy f16-master: execution emulated (per op) on cpu")
    table = rows(text)
    assert table["transformer.h.0.ln_1"][1:] == [
        "LayerNorm", "fp32", "float32", "fp32", "-", "default fp32 island (LayerNorm)"]
    assert table["transformer.h.1.attn.c_attn"][1:] == ["Conv1D", "fp16", "float32", "fp16", "fp32",
                                                         "policy default"]
    assert table["transformer.wte"][1:6] == ["Embedding", "fp16", "float32", "fp16", "fp32"]
    assert table["lm_head"][2] == "fp16"
    assert sum(r[6] == "default fp32 island (LayerNorm)" for r in table.values()) == 5  # 2 per block + ln_f


def test_explain_bert_native_shows_16_bit_storage():
    model, _ = bert()
    text = mp.Policy.parse("f16-master,execution=native").explain(model, device="cpu")
    assert "execution native on cpu" in text.splitlines()[0]
    table = rows(text)
    assert table["bert.embeddings.LayerNorm"][1:5] == ["LayerNorm", "fp32", "float32", "fp32"]
    assert table["bert.encoder.layer.0.attention.self.query"][1:6] == ["Linear", "fp16", "float16", "fp16", "fp32"]


def test_explain_cnn_and_lstm():
    model, _ = cnn()
    table = rows(mp.Policy.parse("f16-master").explain(model))
    assert table["1"][1:] == ["BatchNorm2d", "fp32", "float32", "fp32", "-", "default fp32 island (BatchNorm2d)"]
    assert table["0"][1:6] == ["Conv2d", "fp16", "float32", "fp16", "fp32"]
    table = rows(mp.Policy.parse("bf16-master,rule=head:fp32").explain(Recurrent()))
    assert table["lstm"][1:6] == ["LSTM", "bf16", "float32", "bf16", "fp32"]
    assert table["head"][1:] == ["Linear", "fp32", "float32", "fp32", "-", "rule 1 (head:fp32)"]


def test_gpt2_activations_and_gradients_stay_on_the_fp16_grid():
    model, loss_fn = gpt2()
    model, _, scaler = mp.prepare(model, None, "f16-master")
    stored: list[tuple[str, torch.Tensor]] = []
    grads: list[tuple[str, torch.Tensor]] = []

    def keep(module, args, out, name):
        if isinstance(out, torch.Tensor):
            stored.append((name, out))

    def watch(module, args, out, name):  # before mixprec's hooks: the gradient the module's backward gets
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda g: grads.append((name, g)))

    with mp.autocast(model):
        handles = [h for name, m in model.named_modules() for h in (
            m.register_forward_hook(lambda m, a, o, name=name: keep(m, a, o, name)),
            m.register_forward_hook(lambda m, a, o, name=name: watch(m, a, o, name), prepend=True))]
        loss = loss_fn(model)
    for handle in handles:
        handle.remove()
    scaler.scale(loss).backward()
    assert len(stored) > 20 and len(grads) > 20
    for name, t in stored + grads:
        assert torch.isfinite(t).all() and torch.equal(t, t.half().float()), name
    for name, p in model.named_parameters():
        if "ln" not in name:  # LayerNorms are FP32 islands
            assert torch.equal(p.grad, p.grad.half().float()) and torch.isfinite(p.grad).all(), name


def test_tied_gpt2_embedding_is_stored_in_the_widest_format_its_users_ask_for():
    model, loss_fn = gpt2()
    policy = "f16-master,rule=lm_head:fp32"
    table = rows(mp.Policy.parse(policy).explain(model))
    assert table["transformer.wte"][2] == "fp32" and table["transformer.wte"][5] == "-"
    assert table["transformer.wte"][6] == "policy default; shared weight stored in fp32"
    model, _, _ = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), policy)
    formats = prepared_state(model).param_formats
    assert formats["transformer.wte.weight"] == mp.F32 and "lm_head.weight" not in formats  # one tensor
    assert not torch.equal(model.lm_head.weight, mp.quantize(model.lm_head.weight, mp.F16))
    embedded = []
    with mp.autocast(model):
        handle = model.transformer.wte.register_forward_hook(lambda m, a, out: embedded.append(out))
        loss_fn(model).backward()
    handle.remove()
    # An embedding lookup is no autocast op: from an FP32 weight it returns FP32, natively and emulated.
    assert embedded[0].dtype == torch.float32 and not torch.equal(embedded[0], mp.quantize(embedded[0], mp.F16))
