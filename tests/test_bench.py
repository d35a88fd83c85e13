"""`mixprec bench` and the `gpt` recipes: a CPU run writes the promised JSON, bad input is one line (exit 2),
the tiny GPT learns, GPT-2 small has GPT-2 small's size. The GPU path is checked by the test marked gpu."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import mixprec as mp
from mixprec.cli import main
from mixprec.harness.benchmark import BASELINES, Clock, benchmark, build, goals, parse_runs, run_step, tf32
from mixprec.harness.training import train
from mixprec.recipes import get_recipe
from mixprec.recipes.gpt import SMALL, TINY, markov_tokens, parameter_count

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--recipe", "gpt", "--steps", "2", "--warmup", "1", "--batch-size", "4"]


def test_help_lists_the_options_and_the_baselines(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--recipe", "--policies", "--steps", "--warmup", "--batch-size", "--compile", "--fused",
                   "--device", "--json", "--out", *BASELINES):
        assert option in out, option


def test_cpu_run_writes_json_with_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *FAST, "--policies", "f32,amp-bf16,f16-master", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "f16-master*" in printed and "x f32" in printed  # the table: emulated runs marked
    result = json.loads(out.read_text())
    env = result["environment"]
    for key in ("device", "device_name", "torch", "git_commit", "date", "mixprec"):
        assert key in env, key
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    bench = result["benchmark"]
    assert bench["recipe"] == "gpt" and bench["batch_size"] == 4 and bench["tokens_per_sample"] == TINY.block_size
    assert bench["model_flops_per_step"] > 0 and bench["bf16_matmul_tflops"] is None  # MFU: CUDA only
    runs = {r["policy"]: r for r in result["runs"]}
    assert list(runs) == ["f32", "amp-bf16", "f16-master"]
    assert (runs["f32"]["kind"], runs["amp-bf16"]["kind"]) == ("mixprec", "torch")
    assert runs["f16-master"]["execution"] == "emulated (per op)" and runs["amp-bf16"]["execution"] == "native"
    for row in runs.values():
        for phase in ("forward_ms", "backward_ms", "step_ms", "total_ms", "samples_per_s", "tokens_per_s"):
            assert row[phase] > 0, (row["policy"], phase)
        assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * TINY.block_size)
        assert row["peak_memory_bytes"] == sum(row["memory_held"].values()) > 0  # CPU: mp.memory's count
        assert row["memory_held"]["activations"] > 0 and row["mfu"] is None
        assert set(row["throughput_vs"]) == set(runs) - {row["policy"]}
        assert row["final_loss"] > 0
    # The FP32 masters and 16-bit copies: emulated f16-master holds more than f32, and less in its formats.
    f16, f32 = runs["f16-master"], runs["f32"]
    assert f16["memory_held"]["masters"] > 0 == f32["memory_held"]["masters"]
    assert sum(f16["memory_formats"].values()) < sum(f32["memory_formats"].values())
    assert result["goals"] == []  # the goals are for CUDA


def test_json_flag_prints_json_only(capsys):
    assert main(["bench", *FAST, "--policies", "fp32,fp32-tf32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tf32_run = result["runs"][1]
    assert tf32_run["policy"] == "fp32-tf32" and "exactly as fp32" in tf32_run["note"]


def test_fused_runs_fused_optimizers_on_every_side(capsys):
    assert main(["bench", *FAST, "--policies", "amp-fp16,f16-master", "--fused", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"]["fused"] is True
    assert [r["skipped_steps"] for r in result["runs"]] == [0, 0]
    recipe, device = get_recipe("gpt"), torch.device("cpu")
    torch_run, mixprec_run = (build(spec, recipe, device, compile=False, seed=0, fused=True)
                              for spec in parse_runs("amp-fp16,f16-master", "cpu"))
    assert isinstance(mixprec_run.optimizer, mp.MasterWeights)
    for optimizer in (torch_run.optimizer, mixprec_run.optimizer.optimizer):
        assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
        assert optimizer.defaults["lr"] == recipe.lr and optimizer.defaults["weight_decay"] == recipe.weight_decay
    batch = recipe.make_data().batch(0, 4, seed=0)
    for _ in range(2):  # the first step is synced (no optimizer state yet); the second is not
        run_step(mixprec_run, batch, Clock(device), timed=True)
    assert isinstance(mixprec_run.info.applied, torch.Tensor) and mixprec_run.skipped_steps == 0


def test_fused_refuses_an_optimizer_without_a_fused_variant():
    def no_data():
        raise AssertionError("made the data before refusing the optimizer")

    recipe = dataclasses.replace(get_recipe("gpt"), make_data=no_data,
                                 make_optimizer=lambda params, r: torch.optim.RMSprop(params, lr=r.lr))
    with pytest.raises(ValueError, match="RMSprop has no fused variant .* leave --fused out"):
        benchmark(recipe, "amp-fp16,f16-master", steps=1, warmup=0, batch_size=4, fused=True)


@pytest.mark.parametrize("args, message", [
    (["--policies", "f32,f17-master"], "f17-master"),
    (["--policies", "fp32,fp32"], "listed twice in --policies: fp32"),
    (["--policies", "f16-master,execution=native", "--device", "mps"], "mps"),
    (["--recipe", "mnist"], "unknown recipe 'mnist'"),
    (["--steps", "0"], "--steps: must be an integer >= 1"),
    (["--warmup", "-1"], "--warmup: must be an integer >= 0"),
    (["--batch-size", "100000"], "larger than gpt's training set"),
    (["--device", "tpu"], "--device"),
    (["--out", "."], "is a folder"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_give_one_line_and_exit_2(args, message, capsys):
    try:
        code = main(["bench", "--steps", "1", "--warmup", "0", "--policies", "f32", *args])
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err


def test_tf32_context_sets_and_restores_the_cuda_settings():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with tf32(False, torch.device("cuda")):  # only flags change: no GPU needed
        assert matmul.fp32_precision == "ieee"
        with tf32(True, torch.device("cuda")):
            assert matmul.fp32_precision == "tf32"
        assert matmul.fp32_precision == "ieee"
    assert matmul.fp32_precision == before
    with tf32(True, torch.device("cpu")):  # TF32 is a CUDA mode: nothing changes on a CPU
        assert matmul.fp32_precision == before


def test_goals_compare_the_named_runs():
    rows = [{"policy": "fp32", "mfu": 0.1, "throughput_vs": {"f16-master": 0.25}, "peak_memory_vs": {}},
            {"policy": "f16-master", "mfu": 0.4, "throughput_vs": {"fp32": 4.0},
             "peak_memory_vs": {"fp32": 0.7}}]
    found = {g["goal"]: (g["value"], g["met"]) for g in goals(rows)}
    assert found == {"f16-master throughput / fp32 >= 3": (4.0, True),
                     "f16-master peak memory / fp32 <= 0.6": (0.7, False)}


def test_tiny_gpt_learns_on_cpu():
    recipe = get_recipe("gpt")
    result = train(recipe, "f32", steps=30, threads=1)
    # Starts near log2(512) = 9 bits; the chain's floor is 2 bits per token.
    assert result.initial_metric == pytest.approx(9.0, abs=0.2)
    assert result.final_metric < result.initial_metric - 1.0


def test_gpt2_small_has_gpt2_small_shapes_and_size():
    assert (SMALL.n_layer, SMALL.n_embd, SMALL.n_head, SMALL.block_size, SMALL.vocab_size) == (12, 768, 12, 1024, 50304)
    assert 123.5e6 < parameter_count(SMALL) < 125e6  # GPT-2 small: 124M with tied embeddings
    recipe = get_recipe("gpt2-small")
    with torch.device("meta"):  # nothing allocated
        model = recipe.make_model()
    assert model.head.weight is model.tok_emb.weight  # tied
    assert recipe.optimizer == "adamw" and recipe.metric == "bits/token"


def test_gpt_medium_is_sized_for_16_bit_cpu_hardware():
    recipe = get_recipe("gpt-medium")
    with torch.device("meta"):
        model = recipe.make_model()
    assert (model.config.n_layer, model.config.n_embd, model.config.block_size) == (4, 512, 256)
    assert 13e6 < sum(p.numel() for p in model.parameters()) < 15e6 and model.head.weight is model.tok_emb.weight


def test_synthetic_tokens_follow_a_sparse_chain():
    tokens = markov_tokens(rows=64, length=33, vocab_size=100, seed=5)
    assert torch.equal(tokens, markov_tokens(rows=64, length=33, vocab_size=100, seed=5))
    successors: dict[int, set[int]] = {}
    for a, b in zip(tokens[:, :-1].flatten().tolist(), tokens[:, 1:].flatten().tolist(), strict=True):
        successors.setdefault(a, set()).add(b)
    assert max(map(len, successors.values())) <= 4


def test_bench_train_script_picks_recipe_and_results_file():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cpu = module.defaults(["--device", "cpu"])
    assert cpu[-4:] == ["--recipe", "gpt", "--out", str(ROOT / "benchmarks" / "results" / "bench_cpu.json")]
    gpu = module.defaults(["--device", "cuda", "--compile"])
    assert gpu[-4:] == ["--recipe", "gpt2-small", "--out",
                        str(ROOT / "benchmarks" / "results" / "bench_cuda_compiled.json")]
    assert module.defaults(["--device", "cuda", "--fused"])[-1] == str(ROOT / "benchmarks" / "results" /
                                                                    "bench_cuda_fused.json")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_measures_peak_memory_and_mfu():
    before = torch.backends.cuda.matmul.fp32_precision
    result = benchmark("gpt", "fp32,fp32-tf32,amp-fp16,amp-bf16,f16-master,bf16-master", steps=3, warmup=2,
                       device="cuda")
    assert result["benchmark"]["bf16_matmul_tflops"] > 1
    runs = {r["policy"]: r for r in result["runs"]}
    assert runs["f16-master"]["execution"] == "native" and runs["fp32-tf32"]["note"] is None
    for row in runs.values():
        assert row["peak_memory_bytes"] >= row["memory_held"]["parameters"] > 0
        assert 0 < row["mfu"] < 1 and row["forward_ms"] > 0
    assert {g["goal"] for g in result["goals"]} >= {"bf16-master MFU >= 0.45",
                                                   "f16-master throughput / amp-fp16 >= 1.05"}
    assert torch.backends.cuda.matmul.fp32_precision == before  # the fp32 baselines' TF32 settings restored
