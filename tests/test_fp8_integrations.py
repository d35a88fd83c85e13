"""FP8 training through the framework integrations: the Lightning plugin and the Hugging Face Trainer.

Lightning: an MLP whose middle Linear layers go FP8 (delayed scaling) fits bit for bit as the README loop
trains it, and a checkpoint taken by Lightning carries the amax histories (in the plugin's scaler state),
so resuming ends bitwise where the uninterrupted fit does. Hugging Face: a tiny Llama (its projections are
nn.Linear) trains under fp8-tensorwise close to bf16-master, but not equal to it: the FP8 matmuls ran.
"""

from __future__ import annotations

import math

import pytest
import torch

import mixprec as mp
from mixprec.state import prepared_state

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# ----- Lightning ------------------------------------------------------------------------------------------
DELAYED = "fp8-delayed"
MLP_FP8 = {"net.2", "net.4"}  # the first (net.0) and last (net.6) Linear layers stay BF16
BATCHES, CLIP = 4, 0.3  # gradient norms 0.2-0.7 (measured): about half the steps are clipped


def lightning():
    return pytest.importorskip("lightning.pytorch")


def fast(**kwargs) -> dict:
    return {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
            "enable_checkpointing": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "gradient_clip_val": CLIP, **kwargs}


def mlp_loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * 24, 32, generator=g)
    y = (x[:, :16] * 3).argmax(dim=1)  # a 16-way classification: something to learn in a few steps
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=24, shuffle=False)


def classifier_class():
    pl = lightning()

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                                           torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                                           torch.nn.Linear(64, 16))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x).float(), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    return Classifier


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key].float() - b[key].float()).abs().max()}"


def readme_loop(epochs: int, clip: float | None = CLIP) -> tuple[dict[str, torch.Tensor], mp.LossScaler, list]:
    """The README loop on the same module, seed, batches and order, clipping as the Trainer does."""
    torch.manual_seed(0)
    module = classifier_class()()
    model, optimizer, scaler = mp.prepare(module, module.configure_optimizers(), DELAYED)
    records = []
    for _ in range(epochs):
        for i, batch in enumerate(mlp_loader()):
            with mp.autocast(model):
                loss = model.training_step(batch, i)
            scaler.scale(loss).backward()
            info = mp.step(optimizer, scaler, max_grad_norm=clip)
            optimizer.zero_grad()
            records.append((loss.item(), info))
    return weights(model), scaler, records


def fp8_probe():
    """A callback that keeps what the plugin's FP8 layers hold at the end of the fit (the trainer's teardown
    unprepares the module afterwards), and every step's loss and `mixprec.StepInfo`."""
    pl = lightning()

    class Fp8Probe(pl.Callback):
        def __init__(self) -> None:
            self.layers, self.histories, self.records, self.fp8_at_start = {}, {}, [], None

        def on_train_start(self, trainer, module):
            self.fp8_at_start = trainer.precision_plugin.scaler.state_dict()["fp8"]

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.records.append((outputs["loss"].item(), trainer.precision_plugin.last_step_info))

        def on_train_end(self, trainer, module):
            self.layers = dict(prepared_state(module).fp8_layers)
            self.histories = {n: layer.history.clone() for n, layer in self.layers.items()}

    return Fp8Probe()


def fit(epochs: int, ckpt_path=None, seed: int = 0, callbacks=(), **kwargs):
    pl = lightning()
    from mixprec.integrations.lightning import Precision

    torch.manual_seed(seed)
    module, plugin, probe = classifier_class()(), Precision(DELAYED), fp8_probe()
    trainer = pl.Trainer(plugins=[plugin], max_epochs=epochs, callbacks=[probe, *callbacks], **fast(**kwargs))
    trainer.fit(module, mlp_loader(), ckpt_path=ckpt_path)
    return trainer, module, probe


def test_lightning_fp8_delayed_fit_runs_fp8_layers_and_matches_the_readme_loop_bitwise():
    trainer, module, probe = fit(epochs=2)
    assert set(probe.layers) == MLP_FP8
    assert prepared_state(module) is None  # the trainer's teardown unprepared it; the FP8 forwards are gone
    assert all("forward" not in vars(m) for m in module.modules())
    for name, history in probe.histories.items():
        # 8 steps: each step's amaxes pushed by its mp.step, all 3 roles
        assert history.shape == (3, 16), name
        assert bool((history[:, :8] > 0).all()) and bool((history[:, 8:] == 0).all()), name
        assert not torch.equal(history[:, 0], history[:, 1]), name  # a new amax per step

    expected, scaler, records = readme_loop(epochs=2)
    assert_same(weights(module), expected)
    assert repr(probe.records) == repr(records)  # loss, gradient norm, applied, loss scale at every step
    ours = trainer.precision_plugin.scaler.state_dict()
    assert ours == scaler.state_dict() and ours["fp8"]["layers"].keys() == MLP_FP8
    assert records[-1][0] < records[0][0]  # it learns
    norms = [info.grad_norm for _, info in records]
    assert min(norms) < CLIP < max(norms)  # Trainer(gradient_clip_val=CLIP) clipped some steps inside mp.step:
    unclipped, _, _ = readme_loop(epochs=2, clip=None)
    assert not torch.equal(unclipped["net.2.weight"], expected["net.2.weight"])  # a fit that did not, differs


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_lightning_fp8_checkpoint_resumes_bitwise_with_the_amax_histories(tmp_path):
    pl = lightning()
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    whole, module, _ = fit(epochs=2, callbacks=[every_epoch], enable_checkpointing=True)
    expected, fp8 = weights(module), whole.precision_plugin.scaler.state_dict()["fp8"]

    path = tmp_path / "epoch=0.ckpt"  # written at the end of the first epoch, while the fit ran
    saved = torch.load(path, weights_only=True)["Precision"]["scaler"]["fp8"]
    assert saved["layers"].keys() == MLP_FP8
    history = saved["layers"]["net.2"]["history"]
    assert all(row[3] > 0 and row[4] == 0 for row in history)  # 4 steps' amaxes pushed, one a step
    assert not saved["layers"]["net.2"]["recorded"] and not any(saved["layers"]["net.2"]["pending"])

    # Another seed: the weights, optimizer state, loss scale and FP8 histories all come from the checkpoint.
    resumed, module, probe = fit(epochs=2, ckpt_path=path, seed=1)
    assert probe.fp8_at_start == saved
    assert_same(weights(module), expected)
    assert resumed.precision_plugin.scaler.state_dict()["fp8"] == fp8

    # Without the histories (a checkpoint whose scaler state lost them) the resumed fit ends elsewhere: the
    # comparison above would see a resume that forgot them.
    ckpt = torch.load(path, weights_only=True)
    del ckpt["Precision"]["scaler"]["fp8"]
    torch.save(ckpt, tmp_path / "forgot.ckpt")
    _, module, _ = fit(epochs=2, ckpt_path=tmp_path / "forgot.ckpt", seed=1)
    assert not torch.equal(module.state_dict()["net.2.weight"], expected["net.2.weight"])


def test_lightning_fp8_delayed_pushes_histories_when_training_step_calls_a_submodule():
    # mp.step pushes the amaxes (through the scaler), so no forward of the prepared root needs to run: a
    # training_step calling a submodule (self.net(x), a common Lightning pattern) fills the histories too.
    class CallsNet(classifier_class()):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x).float(), y)

    pl = lightning()
    from mixprec.integrations.lightning import Precision

    torch.manual_seed(0)
    module, probe = CallsNet(), fp8_probe()
    pl.Trainer(plugins=[Precision(DELAYED)], max_epochs=1, callbacks=[probe], **fast()).fit(module, mlp_loader())
    assert set(probe.layers) == MLP_FP8
    for name, history in probe.histories.items():  # 4 steps, 4 pushes
        assert bool((history[:, :4] > 0).all()) and bool((history[:, 4:] == 0).all()), name


# ----- Hugging Face Trainer ---------------------------------------------------------------------------------
STEPS, BATCH = 16, 4
# Measured over these 16 steps: fp8-tensorwise's logged losses within 0.53% of bf16-master's (0.01% at the first
# step, where only the forward matmuls differ; then the runs drift apart as FP8 gradients change the updates).
# E4M3 keeps 3 mantissa bits (up to 2^-4 relative error an element), but the errors average out over dot products
# of 64-128 terms and the first and last Linear (q_proj of layer 0, lm_head) stay BF16. 2% leaves ~4x headroom
# and still catches FP8 layers that lost their scaling (a saturated or underflowing cast is off by far more).
LOSS_RTOL = 0.02


def hf_modules():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = pytest.importorskip("mixprec.integrations.hf")
    return transformers, hf


@pytest.fixture
def fresh_accelerate():
    """Accelerate's process-wide state singletons, reset around each Trainer (as test_integration_hf does)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_llama() -> torch.nn.Module:
    transformers, _ = hf_modules()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, vocab_size=64, max_position_embeddings=32, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)  # from a config: no download


def token_examples() -> list[dict[str, torch.Tensor]]:
    # Counting sequences from random starts: something to learn in a few steps.
    starts = torch.randint(0, 64, (STEPS * BATCH, 1), generator=torch.Generator().manual_seed(1))
    ids = (starts + torch.arange(16)) % 64
    return [{"input_ids": i, "labels": i.clone()} for i in ids]


def train_llama(policy: str, out, **kwargs):
    transformers, hf = hf_modules()
    args = transformers.TrainingArguments(
        out, max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=3e-3, max_grad_norm=1.0,
        train_sampling_strategy="sequential", use_cpu=True, report_to=[], logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, **{"save_strategy": "no", **kwargs})
    return hf.Trainer(policy=policy, model=tiny_llama(), args=args, train_dataset=token_examples())


def explained_fp8(policy: str, model: torch.nn.Module) -> set[str]:
    """The modules explain()'s table marks as FP8 (compute ``fp8/bf16``)."""
    rows = mp.Policy.parse(policy).explain(model).splitlines()[2:]
    return {row.split()[0] for row in rows if row.split()[4].startswith("fp8")}


def test_hf_trainer_fp8_tensorwise_llama_trains_close_to_bf16_master_but_not_equal(tmp_path, fresh_accelerate):
    expected = explained_fp8("fp8-tensorwise", tiny_llama())
    projections = {f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    assert expected == projections - {"model.layers.0.self_attn.q_proj"}  # the model's first Linear stays BF16;
    # lm_head, the last, too

    runs = {}
    for policy in ("bf16-master", "fp8-tensorwise"):
        trainer = train_llama(policy, tmp_path / policy)
        trainer.train()
        state = prepared_state(trainer.model)
        assert isinstance(trainer.optimizer.optimizer, mp.MasterWeights)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
        runs[policy] = losses, weights(trainer.model), set(state.fp8_layers)
        fresh_accelerate._reset_state(reset_partial_state=True)

    (ref, ref_weights, none), (losses, fp8_weights, fp8_layers) = runs.values()
    assert none == set() and fp8_layers == expected  # the Trainer's model ran the layers explain() lists in FP8
    assert losses[-1] < 0.75 * losses[0]  # it learns
    for step, (a, b) in enumerate(zip(losses, ref, strict=True)):
        assert abs(a - b) <= LOSS_RTOL * b, (step, a, b)
    # but the FP8 matmuls ran: every FP8 layer's weights (and the rest, downstream of them) end elsewhere
    assert all(not torch.equal(fp8_weights[f"{n}.weight"], ref_weights[f"{n}.weight"]) for n in expected)


def test_hf_trainer_fp8_delayed_resumes_bitwise_with_the_histories_in_the_optimizer_checkpoint(tmp_path,
                                                                                                 fresh_accelerate):
    # The Trainer saves the scaler (with its "fp8" histories) in the optimizer's state dict.
    whole = train_llama("fp8-delayed", tmp_path / "whole")
    whole.train()
    expected, fp8 = weights(whole.model), whole.scaler.state_dict()["fp8"]
    assert fp8["layers"].keys() == explained_fp8("fp8-delayed", tiny_llama())
    assert all(row[STEPS - 2] > 0 for layer in fp8["layers"].values() for row in layer["history"])
    fresh_accelerate._reset_state(reset_partial_state=True)

    out = tmp_path / "stopped"
    train_llama("fp8-delayed", out, save_strategy="steps", save_steps=STEPS // 2).train()
    saved = torch.load(out / f"checkpoint-{STEPS // 2}" / "optimizer.pt", weights_only=True)["scaler"]["fp8"]
    assert saved["layers"].keys() == fp8["layers"].keys() and saved != fp8
    history = saved["layers"]["model.layers.1.mlp.down_proj"]["history"]  # 8 steps' amaxes pushed, one a step
    assert all(row[STEPS // 2 - 1] > 0 and row[STEPS // 2] == 0 for row in history)
    fresh_accelerate._reset_state(reset_partial_state=True)
    resumed = train_llama("fp8-delayed", out, save_strategy="steps", save_steps=STEPS // 2)
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{STEPS // 2}"))
    assert_same(weights(resumed.model), expected)
    assert resumed.scaler.state_dict()["fp8"] == fp8


def test_gpt2_gets_no_fp8_layers_its_projections_are_conv1d_not_linear():
    transformers, _ = hf_modules()
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    table = mp.Policy.parse("fp8-tensorwise").explain(model)
    assert explained_fp8("fp8-tensorwise", model) == set()  # a documented limit: FP8 goes into nn.Linear only
    assert "Conv1D" in table and "not fp8: the last Linear layer" in table  # lm_head, the only Linear
    mp.prepare(model, None, "fp8-tensorwise")
    assert prepared_state(model).fp8_layers == {}
