"""mixprec.integrations.hf: the Hugging Face Trainer and an Accelerate loop against the plain mixprec loop.

A tiny GPT-2 (from a config, no download) trains 20 steps under f16-master (emulated on CPU) with an
initial loss scale of 2^24, so that the first 10 steps overflow and are skipped. The Trainer and the
Accelerate loop must give the plain loop's (the README's) losses, loss scales, gradient norms, learning
rates and final weights exactly: the same arithmetic in the same order, so bitwise equal.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import mixprec as mp

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
hf = pytest.importorskip("mixprec.integrations.hf")

from accelerate.state import AcceleratorState  # noqa: E402

# 2^24, the largest initial scale a DynamicScaler takes: with hysteresis 2 the scale halves from the
# second overflow on, and the gradients fit FP16 again at 2^15, after 10 skipped steps.
POLICY = "f16-master,scaling=dynamic:16777216"
STEPS, BATCH, LR = 20, 4, 3e-3
# From 2^24 the first steps overflow while the scale halves (measured: steps 1-6 always, and a few later
# ones near FP16's edge, which depend on FP32 summation order, so the reference run counts them).
STOP = 6  # where the resume tests stop: after a skipped step, the scale still falling


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Accelerate keeps its state (mixed precision, device) in process-wide singletons that refuse a
    different setting once made; every Trainer and Accelerator here starts from a clean one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def examples() -> list[dict[str, torch.Tensor]]:
    # Counting sequences from random starts: something to learn in 10 steps.
    starts = torch.randint(0, 64, (STEPS * BATCH, 1), generator=torch.Generator().manual_seed(1))
    ids = (starts + torch.arange(16)) % 64
    # The Trainer divides the summed causal-LM loss by the number of labels != -100, counted before the
    # shift for GPT2LMHeadModel (its loss_type is None); model(**batch).loss averages over the shifted
    # labels. Masking the first label, which no position predicts, makes the two counts equal.
    labels = ids.clone()
    labels[:, 0] = -100
    return [{"input_ids": i, "labels": t} for i, t in zip(ids, labels, strict=True)]


def batches() -> list[dict[str, torch.Tensor]]:
    data = examples()
    return [{k: torch.stack([d[k] for d in data[i:i + BATCH]]) for k in data[0]} for i in range(0, len(data), BATCH)]


def training_args(out, **kwargs) -> transformers.TrainingArguments:
    kwargs = {"save_strategy": "no", **kwargs}
    return transformers.TrainingArguments(
        out, max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR, weight_decay=0.01,
        max_grad_norm=1.0, train_sampling_strategy="sequential", use_cpu=True, report_to=[], logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, **kwargs)


def trainer_optimizer(model: torch.nn.Module, args: transformers.TrainingArguments) -> torch.optim.Optimizer:
    """The optimizer the Trainer builds (AdamW, weight decay on all but biases and LayerNorms)."""
    return transformers.Trainer(model=model, args=args).create_optimizer()


def record(losses, lrs, infos, model, optimizer) -> dict:
    return {"loss": losses, "lr": lrs, "loss_scale": [i.loss_scale for i in infos],
            "grad_norm": [i.grad_norm for i in infos], "applied": [i.applied for i in infos],
            "weights": {k: v.clone() for k, v in model.state_dict().items()},
            "masters": [m.clone() for m in optimizer.master_params]}


def plain_loop(args: transformers.TrainingArguments) -> dict:
    """The README loop, with model(**batch).loss, the Trainer's optimizer and its linear LR schedule."""
    model = tiny_gpt2()
    model, optimizer, scaler = mp.prepare(model, trainer_optimizer(model, args), POLICY)
    scheduler = transformers.get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=STEPS)
    losses, lrs, infos = [], [], []
    model.train()
    for batch in batches():
        with mp.autocast(model):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        info = mp.step(optimizer, scaler, max_grad_norm=args.max_grad_norm)
        lrs.append(scheduler.get_last_lr()[0])  # the rate this step used
        if info.applied:
            scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        infos.append(info)
    assert scheduler.last_epoch == sum(i.applied for i in infos)
    return record(losses, lrs, infos, model, optimizer)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    ref = plain_loop(training_args(tmp_path_factory.mktemp("plain")))
    applied = ref["applied"]
    assert applied[:STOP] == [False] * STOP and sum(applied) >= STEPS // 2
    # Skipped steps hold the schedule: the LR moves (down) only after an applied step.
    for i in range(STEPS - 1):
        assert (ref["lr"][i + 1] < ref["lr"][i]) if applied[i] else (ref["lr"][i + 1] == ref["lr"][i]), i
    assert ref["lr"][0] == LR and ref["loss"][-1] < ref["loss"][applied.index(True)]  # and it learns
    return ref


def same_numbers(a: list, b: list) -> bool:
    """Equal, NaN included (the gradient norm of an overflowing step)."""
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))


def assert_matches(run: dict, ref: dict) -> None:
    assert run["loss"] == ref["loss"]
    assert run["lr"] == ref["lr"]  # the scheduler did not advance on the skipped steps
    assert run["loss_scale"] == ref["loss_scale"]
    assert same_numbers(run["grad_norm"], ref["grad_norm"])
    for name, w in ref["weights"].items():
        assert torch.equal(run["weights"][name], w), name
    for a, b in zip(run["masters"], ref["masters"], strict=True):
        assert torch.equal(a, b)


# ----- Trainer --------------------------------------------------------------------------------------------
def test_trainer_matches_the_plain_loop(tmp_path, reference):
    trainer = hf.Trainer(policy=POLICY, model=tiny_gpt2(), args=training_args(tmp_path), train_dataset=examples())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == list(range(1, STEPS + 1))
    run = record([h["loss"] for h in logs], [h["learning_rate"] for h in logs], [], trainer.model,
                 trainer.optimizer.optimizer)
    run.update(loss_scale=[h["mixprec/loss_scale"] for h in logs], grad_norm=[h["grad_norm"] for h in logs])
    assert_matches(run, reference)
    skipped = [not a for a in reference["applied"]]
    assert [h["mixprec/skipped_steps"] for h in logs] == [sum(skipped[:i]) for i in range(1, STEPS + 1)]
    assert [repr(h["mixprec/grad_norm"]) for h in logs] == [repr(h["grad_norm"]) for h in logs]  # as Lightning logs
    assert trainer.lr_scheduler.last_epoch == STEPS - sum(skipped) and trainer.state.global_step == STEPS
    assert trainer.last_step_info.applied and mp.prepared_state(trainer.model).execution == "emulated"


def test_trainer_with_gradient_checkpointing_matches_the_plain_loop(tmp_path, reference):
    # TrainingArguments(gradient_checkpointing=True): backward recomputes each block's forward, which must
    # run as it ran inside mp.autocast (the same dtypes and values): bit for bit the loop without it.
    args = training_args(tmp_path, gradient_checkpointing=True)
    trainer = hf.Trainer(policy=POLICY, model=tiny_gpt2(), args=args, train_dataset=examples())
    trainer.train()
    assert trainer.model.is_gradient_checkpointing
    logs = [h for h in trainer.state.log_history if "loss" in h]
    run = record([h["loss"] for h in logs], [h["learning_rate"] for h in logs], [], trainer.model,
                 trainer.optimizer.optimizer)
    run.update(loss_scale=[h["mixprec/loss_scale"] for h in logs], grad_norm=[h["grad_norm"] for h in logs])
    assert_matches(run, reference)


def test_trainer_resumes_from_a_checkpoint_as_if_never_stopped(tmp_path, reference):
    """The scaler travels in the optimizer's checkpoint: stopping at step 9 (a skipped step, scale still
    halving) and resuming gives the uninterrupted run's weights."""
    args = training_args(tmp_path, save_strategy="steps", save_steps=STOP)
    hf.Trainer(policy=POLICY, model=tiny_gpt2(), args=args, train_dataset=examples()).train()
    trainer = hf.Trainer(policy=POLICY, model=tiny_gpt2(), args=args, train_dataset=examples())
    trainer.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{STOP}"))
    for name, w in reference["weights"].items():
        assert torch.equal(trainer.model.state_dict()[name], w), name
    assert trainer.scaler.loss_scale == reference["loss_scale"][-1]


@pytest.mark.parametrize("flag", ["fp16", "bf16"])
def test_trainer_refuses_the_trainers_own_mixed_precision(tmp_path, flag):
    args = training_args(tmp_path, **{flag: True})
    with pytest.raises(ValueError, match=f"drop {flag} from the TrainingArguments"):
        hf.Trainer(policy="f16-master", model=tiny_gpt2(), args=args, train_dataset=examples())


def test_trainer_refuses_to_step_on_an_unscaled_loss(tmp_path):
    class MyTrainer(hf.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss  # not super().compute_loss: no loss scaling

    trainer = MyTrainer(policy=POLICY, model=tiny_gpt2(), args=training_args(tmp_path), train_dataset=examples())
    with pytest.raises(RuntimeError, match="the loss was not scaled"):
        trainer.train()


# ----- Accelerate -----------------------------------------------------------------------------------------
def accelerate_loop(args, steps: slice, save_to=None, load_from=None) -> dict:
    """The README loop under Accelerate: prepare_accelerated, accelerator.backward, mp.step."""
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="no")
    model = tiny_gpt2()
    loader = torch.utils.data.DataLoader(examples(), batch_size=BATCH, shuffle=False)
    model, optimizer, scaler, loader = hf.prepare_accelerated(accelerator, model, trainer_optimizer(model, args),
                                                              POLICY, loader)
    scheduler = transformers.get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=STEPS)
    accelerator.register_for_checkpointing(scheduler)
    if load_from is not None:
        accelerator.load_state(load_from)  # weights, masters, optimizer state, loss scaler, scheduler
    losses, lrs, infos = [], [], []
    model.train()
    for batch in list(loader)[steps]:
        with mp.autocast(model):
            loss = model(**batch).loss
        accelerator.backward(scaler.scale(loss))
        info = mp.step(optimizer, scaler, max_grad_norm=args.max_grad_norm)
        lrs.append(scheduler.get_last_lr()[0])
        if info.applied:
            scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        infos.append(info)
    if save_to is not None:
        accelerator.save_state(save_to)
    return record(losses, lrs, infos, model, optimizer)


def test_accelerate_loop_matches_the_plain_loop(tmp_path, reference):
    assert_matches(accelerate_loop(training_args(tmp_path), slice(None)), reference)


def test_accelerate_resumes_from_save_state_as_if_never_stopped(tmp_path, reference):
    args = training_args(tmp_path)
    accelerate_loop(args, slice(None, STOP), save_to=tmp_path / "state")
    AcceleratorState._reset_state(reset_partial_state=True)
    run = accelerate_loop(args, slice(STOP, None), load_from=tmp_path / "state")
    assert run["loss_scale"] == reference["loss_scale"][STOP:]
    assert run["lr"] == reference["lr"][STOP:]
    for name, w in reference["weights"].items():
        assert torch.equal(run["weights"][name], w), name


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_accelerate_mixed_precision_with_mixprec_is_an_error(precision):
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision=precision)
    with pytest.raises(ValueError, match="mixed_precision='no'"):
        hf.check_accelerator(accelerator)
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=f"mixed_precision='{precision}'"):
        hf.prepare_accelerated(accelerator, model, torch.optim.AdamW(model.parameters()), "f16-master")
    assert mp.prepared_state(model) is None  # checked before anything was changed


def test_trainer_refuses_an_accelerate_config_with_mixed_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # as `accelerate launch` with an fp16 config sets
    with pytest.raises(ValueError, match="ACCELERATE_MIXED_PRECISION"):
        hf.Trainer(policy="f16-master", model=tiny_gpt2(), args=training_args(tmp_path), train_dataset=examples())


def test_importing_the_integration_imports_neither_framework():
    code = ("import sys, mixprec, mixprec.integrations.hf\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


ACCELERATE_WORKER = r'''
import sys, torch, transformers, accelerate
sys.path.insert(0, sys.argv[1])
import mixprec as mp
import test_integration_hf as t
from mixprec.integrations import hf

torch.set_num_threads(1)
accelerator = accelerate.Accelerator(cpu=True, mixed_precision="no")
model = t.tiny_gpt2()
args = t.training_args(sys.argv[2])
loader = torch.utils.data.DataLoader(t.examples(), batch_size=t.BATCH, shuffle=False)
model, optimizer, scaler, loader = hf.prepare_accelerated(accelerator, model, t.trainer_optimizer(model, args),
                                                          t.POLICY, loader)
losses, applied = [], []
for batch in loader:
    with mp.autocast(model):
        loss = model(**batch).loss
    accelerator.backward(scaler.scale(loss))
    applied.append(mp.step(optimizer, scaler, max_grad_norm=1.0).applied)
    optimizer.zero_grad()
    losses.append(loss.item())
torch.save({"kind": type(model).__name__, "world": accelerator.num_processes, "losses": losses, "applied": applied,
            "weights": [p.detach().clone() for p in model.parameters()],
            "masters": [m.detach().clone() for m in optimizer.master_params]},
           f"{sys.argv[2]}/rank{accelerator.process_index}.pt")
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()  # gloo aborts at exit now and then when the group is left alive
'''


TRAINER_WORKER = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_integration_hf as t
from mixprec.integrations import hf

torch.set_num_threads(1)
args = t.training_args(sys.argv[2], ddp_backend="gloo")
trainer = hf.Trainer(policy=t.POLICY, model=t.tiny_gpt2(), args=args, train_dataset=t.examples())
trainer.train()
logs = [h for h in trainer.state.log_history if "loss" in h]
torch.save({"world": args.world_size, "kind": type(trainer.model_wrapped).__name__,
            "skipped": [h["mixprec/skipped_steps"] for h in logs], "losses": [h["loss"] for h in logs],
            "weights": [p.detach().clone() for p in trainer.model.parameters()],
            "masters": [m.detach().clone() for m in trainer.optimizer.optimizer.master_params]},
           f"{sys.argv[2]}/rank{args.process_index}.pt")
trainer.accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()  # gloo aborts at exit now and then when the group is left alive
'''


@pytest.mark.parametrize("worker", ["accelerate", "trainer"])
def test_two_processes_keep_replicas_bitwise_equal(tmp_path, worker):
    # torchrun, 2 CPU processes: Accelerate (and the Trainer through it) wraps the prepared model in DDP
    # (gloo) and shards the batches. Every rank takes the same skip decisions, and weights and FP32
    # masters stay bitwise equal across the ranks.
    script = tmp_path / "worker.py"
    script.write_text(ACCELERATE_WORKER if worker == "accelerate" else TRAINER_WORKER)
    tests = str(__import__("pathlib").Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           str(script), tests, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["kind"] == "DistributedDataParallel" and r0["world"] == 2
    if worker == "accelerate":
        assert len(r0["losses"]) == STEPS // 2 and r0["losses"] != r1["losses"]  # sharded: each rank its rows
        assert r0["applied"] == r1["applied"] and any(r0["applied"]) and not all(r0["applied"])
    else:  # the Trainer logs the loss averaged over the ranks, and the skipped steps so far
        assert r0["skipped"] == r1["skipped"] and 0 < r0["skipped"][-1] < len(r0["skipped"])
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(r0["masters"], r1["masters"], strict=True))


def test_trainer_with_compact_masters_trains_as_with_fp32_masters(tmp_path):
    # Masters rebuilt per step (bf16-compact) through the Trainer: the same losses and weights as bf16-master.
    runs = {}
    for policy in ("bf16-master", "bf16-compact"):
        trainer = hf.Trainer(policy=policy, model=tiny_gpt2(), args=training_args(tmp_path / policy),
                             train_dataset=examples())
        trainer.train()
        inner = trainer.optimizer.optimizer
        assert isinstance(inner, mp.MasterWeights) and inner.mode == policy.split("-")[1].replace("master", "fp32")
        runs[policy] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                        {k: v.clone() for k, v in trainer.model.state_dict().items()},
                        [inner.master_value(s) for s in inner.grad_slots])
        AcceleratorState._reset_state(reset_partial_state=True)
    (losses, weights, masters), (losses2, weights2, masters2) = runs.values()
    assert losses == losses2 and len(losses) == STEPS
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)
    # Masters equal but where one met the tie compact keeps 1 FP32 ulp lower (about 1 element-step in 2^17),
    # a difference later updates may carry on by an ulp or so (measured: 3 elements, 1-2 ulps apart).
    apart = [(a.view(torch.int32) - b.view(torch.int32)).abs() for a, b in zip(masters, masters2, strict=True)]
    assert all(int(d.max()) <= 4 for d in apart)
    assert sum(int((d > 0).sum()) for d in apart) <= sum(m.numel() for m in masters) * STEPS * 4 / 2**17


def test_the_private_trainer_methods_overridden_are_checked_against_the_installed_transformers(tmp_path, monkeypatch):
    # No public hook keeps the Trainer from clipping scaled gradients: mixprec overrides two private methods, and
    # refuses a transformers where they are missing or take other arguments (instead of clipping wrongly).
    import inspect

    assert list(inspect.signature(transformers.Trainer._clip_grad_norm).parameters) == ["self", "model"]
    assert list(inspect.signature(transformers.Trainer._get_grad_norm).parameters) == ["self", "model", "grad_norm"]
    monkeypatch.setattr(transformers.Trainer, "_get_grad_norm", lambda self, model, grad_norm, extra=None: None)
    with pytest.raises(RuntimeError, match=r"Trainer._get_grad_norm\(self, model, grad_norm, extra\)"):
        hf.Trainer(policy=POLICY, model=tiny_gpt2(), args=training_args(tmp_path), train_dataset=examples())
