"""The bad-input corpus (issue 12 item 4, issue 15): every bad input is a clear error, never a silent change.

Each case checks the exception type and that the message names the bad value and what is valid. At the
command line every usage error is one line on stderr, exit status 2, no traceback, and nothing written.
docs/reliability.md has the table of these cases and what each says.

A case marked xfail(strict) is a gap in a module this file does not own; the mark names it, and the
test fails loudly once the module is fixed, so that the mark is removed.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

import mixprec as mp
from mixprec.cli import main
from mixprec.harness.checkpoints import list_checkpoints

NO_CUDA = not torch.cuda.is_available()
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
TYPE_OR_VALUE = (TypeError, ValueError)  # a wrong type may raise either; what matters is the message


def case(name: str, call: Callable[[], object], error: type | tuple[type, ...], needles: list[str], *,
         xfail: str | None = None, skip: str | None = None):
    """One row: ``call()`` raises `error` whose message holds each of `needles` (the bad value, what is valid)."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    marks += [pytest.mark.skip(reason=skip)] if skip else []
    return pytest.param(call, error, needles, id=name, marks=marks)


def check(call: Callable[[], object], error: type | tuple[type, ...], needles: list[str]) -> None:
    with pytest.raises(error) as info:
        call()
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


# ----- malformed policy strings -----------------------------------------------------------------------------


def policy(text: object, error: type, needles: list[str]):
    return case(repr(text), lambda: mp.Policy.parse(text), error, needles)


POLICY_STRINGS = [
    policy("foo=1", ValueError, ["'foo=1'", "valid keys", "params"]),
    policy("f16-master,bogus=2", ValueError, ["'bogus=2'", "valid keys"]),
    policy("params=fp17", ValueError, ["'fp17'", "valid names", "fp16"]),
    policy("rule=lm_head:fp99", ValueError, ["'fp99'", "valid names"]),
    policy("f99", ValueError, ["'f99'", "valid presets", "f16-master"]),
    policy("f16-master,f32", ValueError, ["'f32'", "a preset name may only come first"]),
    # a key given twice used to keep the last one silently
    policy("params=f16,params=bf16", ValueError, ["'params'", "twice", "'params=f16'", "'params=bf16'"]),
    policy("params=f16,PARAMS=f16", ValueError, ["'params'", "twice"]),
    policy("f16-master,scaling=none,scaling=dynamic", ValueError, ["'scaling'", "twice"]),
    policy("", ValueError, ["empty policy string", "f16-master"]),
    policy(" , ,", ValueError, ["empty policy string", "f16-master"]),
    policy("params=", ValueError, ["''", "valid names"]),
    policy("=f16", ValueError, ["'=f16'", "valid keys"]),
    policy("scaling=dynamic:abc", ValueError, ["'dynamic:abc'", "not a number", "'static:1024'"]),
    policy("scaling=static:-1", ValueError, ["'static:-1'", "positive and finite", "'static:1024'"]),
    policy("scaling=static:0", ValueError, ["'static:0'", "positive and finite"]),
    policy("scaling=static:nan", ValueError, ["'static:nan'", "positive and finite"]),
    policy("scaling=static:inf", ValueError, ["'static:inf'", "positive and finite"]),
    policy("scaling=static", ValueError, ["'static'", "'static:S'"]),
    policy("scaling=none:3", ValueError, ["'none:3'", "'none'"]),
    policy("scaling=sometimes", ValueError, ["'sometimes'", "'dynamic'"]),
    policy("execution=fast", ValueError, ["'fast'", "auto, native, emulated"]),
    policy("params=f16,master=bf16", ValueError, ["master=bf16", "master=fp32", "master=none"]),
    policy("rule=lm_head", ValueError, ["'lm_head'", "MATCH:COMPUTE"]),
    policy("rule=:fp32", ValueError, ["':fp32'", "MATCH:COMPUTE"]),
    policy(5, TypeError, ["int", "string or a Policy"]),
    policy(None, TypeError, ["NoneType", "string or a Policy"]),
    # issue 15: 1e-45 is 0.0 in float32 (every step NaN), 1e39 is inf (every step skipped). Refused by
    # the policy string or, at the latest, by the scaler it makes, before any step.
    *(case(repr(text), lambda text=text: mp.Policy.parse(text).make_scaler(), ValueError, [value])
      for text, value in [("scaling=static:1e-45", "1e-45"), ("scaling=dynamic:1e-50", "1e-50")]),
]


@pytest.mark.parametrize(("call", "error", "needles"), POLICY_STRINGS)
def test_malformed_policy_strings(call, error, needles):
    check(call, error, needles)


def test_overrides_and_repeated_rules_still_parse():
    # Overriding a preset's field once is what overrides are for; only a second value is refused.
    assert mp.Policy.parse("f16-master,scaling=none") == mp.Policy.parse("f16-master-noscale")
    assert len(mp.Policy.parse("rule=a:fp32,rule=b:fp32").rules) == 2  # rule= may repeat


# ----- invalid scaler arguments ---------------------------------------------------------------------------

SCALER_ARGUMENTS = [
    case("static -1", lambda: mp.StaticScaler(-1), ValueError, ["scale", "-1", "must"]),
    case("static 0", lambda: mp.StaticScaler(0), ValueError, ["scale", "got 0", "must"]),
    case("static nan", lambda: mp.StaticScaler(math.nan), ValueError, ["scale", "nan", "must"]),
    case("static inf", lambda: mp.StaticScaler(math.inf), ValueError, ["scale", "inf", "must"]),
    case("static '8'", lambda: mp.StaticScaler("8"), TYPE_OR_VALUE, ["scale", "'8'"]),
    case("static None", lambda: mp.StaticScaler(None), TYPE_OR_VALUE, ["scale", "None"]),
    case("static True", lambda: mp.StaticScaler(True), TYPE_OR_VALUE, ["scale", "True"]),
    case("static 1e-50, 0 in float32", lambda: mp.StaticScaler(1e-50), ValueError, ["1e-50"]),
    case("static 1e39, inf in float32", lambda: mp.StaticScaler(1e39), ValueError, ["1e+39"]),
    case("init_scale -1", lambda: mp.DynamicScaler(init_scale=-1), ValueError, ["init_scale", "-1", "must"]),
    case("init_scale 0", lambda: mp.DynamicScaler(init_scale=0), ValueError, ["init_scale", "got 0"]),
    case("init_scale nan", lambda: mp.DynamicScaler(init_scale=math.nan), ValueError, ["init_scale", "nan"]),
    case("init_scale inf", lambda: mp.DynamicScaler(init_scale=math.inf), ValueError, ["init_scale", "inf"]),
    case("init_scale 'x'", lambda: mp.DynamicScaler(init_scale="x"), TYPE_OR_VALUE, ["init_scale", "'x'"]),
    case("init_scale above max_scale", lambda: mp.DynamicScaler(init_scale=2.0**30), ValueError,
         ["init_scale", "1073741824", "max_scale"]),
    case("init_scale 1e-50, 0 in float32", lambda: mp.DynamicScaler(init_scale=1e-50, min_scale=0), ValueError,
         ["1e-50"]),
    case("growth_factor 1", lambda: mp.DynamicScaler(growth_factor=1), ValueError, ["growth_factor", "got 1", "must"]),
    case("growth_factor 0.5", lambda: mp.DynamicScaler(growth_factor=0.5), ValueError, ["growth_factor", "0.5"]),
    case("growth_factor nan", lambda: mp.DynamicScaler(growth_factor=math.nan), ValueError, ["growth_factor", "nan"]),
    case("growth_factor '2'", lambda: mp.DynamicScaler(growth_factor="2"), TYPE_OR_VALUE, ["growth_factor", "'2'"]),
    case("backoff_factor 1", lambda: mp.DynamicScaler(backoff_factor=1), ValueError, ["backoff_factor", "must"]),
    case("backoff_factor 0", lambda: mp.DynamicScaler(backoff_factor=0), ValueError, ["backoff_factor", "got 0"]),
    case("backoff_factor nan", lambda: mp.DynamicScaler(backoff_factor=math.nan), ValueError,
         ["backoff_factor", "nan"]),
    case("growth_interval 0", lambda: mp.DynamicScaler(growth_interval=0), ValueError, ["growth_interval", "got 0"]),
    case("growth_interval 2.5", lambda: mp.DynamicScaler(growth_interval=2.5), TYPE_OR_VALUE,
         ["growth_interval", "2.5", "must"]),
    case("hysteresis 0", lambda: mp.DynamicScaler(hysteresis=0), ValueError, ["hysteresis", "got 0", "must"]),
    case("min_scale -1", lambda: mp.DynamicScaler(min_scale=-1), ValueError, ["min_scale", "-1", "must"]),
    case("min_scale nan", lambda: mp.DynamicScaler(min_scale=math.nan), ValueError, ["min_scale", "nan"]),
    case("max_scale 0", lambda: mp.DynamicScaler(max_scale=0), ValueError, ["max_scale", "got 0", "must"]),
    case("max_scale nan", lambda: mp.DynamicScaler(max_scale=math.nan), ValueError, ["max_scale", "nan"]),
    case("min_scale > max_scale", lambda: mp.DynamicScaler(min_scale=10, max_scale=1), ValueError,
         ["min_scale", "10", "max_scale"]),
]


@pytest.mark.parametrize(("call", "error", "needles"), SCALER_ARGUMENTS)
def test_invalid_scaler_arguments(call, error, needles):
    check(call, error, needles)


# ----- mismatched or foreign state dicts --------------------------------------------------------------------

def _changed(state: dict, **changes: object) -> dict:
    return {**state, **changes}


def _linear() -> torch.nn.Module:
    return torch.nn.Linear(3, 2)


def _prepared(model: torch.nn.Module, optimizer: type = torch.optim.SGD, policy: str = "f16-master"):
    """(model, optimizer wrapped in MasterWeights, scaler) for `model` under `policy`."""
    return mp.prepare(model, optimizer(model.parameters(), lr=0.1), policy)


def _masters(**kwargs: object) -> mp.MasterWeights:
    return _prepared(kwargs.pop("model", _linear()), **kwargs)[1]


def _dynamic(**changes: object) -> dict:
    return _changed(mp.DynamicScaler().state_dict(), **changes)


def _static(**changes: object) -> dict:
    return _changed(mp.StaticScaler(2.0).state_dict(), **changes)


STATE_DICTS = [
    case("dynamic <- static's", lambda: mp.DynamicScaler().load_state_dict(_static()), ValueError,
         ["'StaticScaler'", "'DynamicScaler'"]),
    case("static <- dynamic's", lambda: mp.StaticScaler(8.0).load_state_dict(_dynamic()), ValueError,
         ["'DynamicScaler'", "'StaticScaler'"]),
    case("none <- static's", lambda: mp.NoScaler().load_state_dict(_static()), ValueError,
         ["'StaticScaler'", "'NoScaler'"]),
    case("dynamic, a key missing", lambda: mp.DynamicScaler().load_state_dict(
        {k: v for k, v in _dynamic().items() if k != "growth_tracker"}), ValueError,
         ["missing keys ['growth_tracker']", "expected exactly"]),
    case("static, an extra key", lambda: mp.StaticScaler(2.0).load_state_dict(_static(extra=1)), ValueError,
         ["unexpected keys ['extra']"]),
    case("static, version 99", lambda: mp.StaticScaler(2.0).load_state_dict(_static(version=99)), ValueError,
         ["version 99", "version 1"]),
    case("dynamic, scale 'big'", lambda: mp.DynamicScaler().load_state_dict(_dynamic(scale="big")), TYPE_OR_VALUE,
         ["'big'", "must"]),
    case("dynamic, scale nan", lambda: mp.DynamicScaler().load_state_dict(_dynamic(scale=math.nan)), ValueError,
         ["nan", "must"]),
    case("static, scale 0", lambda: mp.StaticScaler(2.0).load_state_dict(_static(scale=0.0)), ValueError,
         ["scale", "0.0", "must"]),
    case("scaler <- a list", lambda: mp.StaticScaler(2.0).load_state_dict([1.0]), TYPE_OR_VALUE,
         ["list", "state_dict()"]),
    case("dynamic, growth_tracker 'x'", lambda: mp.DynamicScaler().load_state_dict(_dynamic(growth_tracker="x")),
         TYPE_OR_VALUE, ["growth_tracker", "'x'"]),
    case("static, skipped_steps -3", lambda: mp.StaticScaler(2.0).load_state_dict(_static(skipped_steps=-3)),
         ValueError, ["skipped_steps", "-3"]),
    case("dynamic <- torch GradScaler's",
         lambda: mp.DynamicScaler().load_state_dict(torch.amp.GradScaler("cpu").state_dict()), ValueError,
         ["'DynamicScaler'", "GradScaler"]),
    case("masters <- a plain optimizer's",
         lambda: _masters().load_state_dict(torch.optim.SGD(_linear().parameters(), lr=0.1).state_dict()),
         ValueError, ["not a MasterWeights state dict", "['param_groups', 'state']", "expected keys"]),
    case("masters <- another model's (count)",
         lambda: _masters().load_state_dict(
             _masters(model=torch.nn.Sequential(_linear(), torch.nn.Linear(2, 2))).state_dict()),
         ValueError, ["4 parameters", "has 2", "different model"]),
    case("masters <- another model's (shapes)",
         lambda: _masters().load_state_dict(_masters(model=torch.nn.Linear(4, 2)).state_dict()),
         ValueError, ["(2, 4)", "(2, 3)", "different model"]),
    case("masters <- a pure policy's", lambda: _masters().load_state_dict(_masters(policy="f16-pure").state_dict()),
         ValueError, ["mode='none'", "masters on the same parameters"]),
    case("masters <- None", lambda: _masters().load_state_dict(None), TYPE_OR_VALUE, ["NoneType", "expected keys"]),
    case("masters over SGD <- over Adam",
         lambda: _masters().load_state_dict(_masters(optimizer=torch.optim.Adam).state_dict()), ValueError,
         ["Adam", "SGD"]),
]


@pytest.mark.parametrize(("call", "error", "needles"), STATE_DICTS)
def test_mismatched_or_foreign_state_dicts(call, error, needles):
    check(call, error, needles)


# ----- wrong dtypes, types and devices ----------------------------------------------------------------------


def _step_without_gradients() -> None:
    model, optimizer, scaler = _prepared(_linear())
    mp.step(optimizer, scaler)


def _step(**kwargs: object) -> Callable[[], object]:
    """mp.step after one backward, with some arguments replaced."""
    def call() -> object:
        model, optimizer, scaler = _prepared(_linear())
        scaler.scale(model(torch.ones(1, 3)).sum()).backward()
        arguments = {"optimizer": optimizer, "scaler": scaler, **kwargs}
        return mp.step(arguments.pop("optimizer"), arguments.pop("scaler"), **arguments)
    return call


WRONG_TYPES = [
    case("quantize an int tensor", lambda: mp.quantize(torch.arange(4), mp.F16), TypeError,
         ["torch.int64", "floating-point", "x.float()"]),
    case("quantize a bool tensor", lambda: mp.quantize(torch.ones(2, dtype=torch.bool), mp.F16), TypeError,
         ["torch.bool", "floating-point"]),
    case("quantize a list", lambda: mp.quantize([1.0], mp.F16), TypeError, ["list", "torch.Tensor"]),
    case("quantize onto 'fp17'", lambda: mp.quantize(torch.ones(2), "fp17"), ValueError, ["'fp17'", "valid names"]),
    case("quantize onto 16", lambda: mp.quantize(torch.ones(2), 16), TypeError, ["int", "a name or a Format"]),
    case("quantize rounding 'up'", lambda: mp.quantize(torch.ones(2), mp.F16, rounding="up"), ValueError,
         ["'up'", "'nearest' or 'stochastic'"]),
    case("format e9m2", lambda: mp.Format.parse("e9m2"), ValueError, ["got 9", "2..8"]),
    case("format with -1 mantissa bits", lambda: mp.Format("x", 5, -1), ValueError, ["got -1", "0..23"]),
    case("prepare a string", lambda: mp.prepare("model", None, "f16-master"), TypeError, ["str", "torch.nn.Module"]),
    case("prepare None", lambda: mp.prepare(None, None, "f16-master"), TypeError, ["NoneType", "torch.nn.Module"]),
    case("prepare with optimizer 'sgd'", lambda: mp.prepare(_linear(), "sgd", "f16-master"), TypeError,
         ["str", "torch.optim.Optimizer"]),
    case("prepare with policy 'f99'", lambda: mp.prepare(_linear(), None, "f99"), ValueError,
         ["'f99'", "valid presets"]),
    case("prepare with policy 3", lambda: mp.prepare(_linear(), None, 3), TypeError, ["int", "string"]),
    case("prepare twice", lambda: mp.prepare(_prepared(_linear())[0], None, "f16-master"), RuntimeError,
         ["already prepared", "unprepare"]),
    # torch's own messages for devices (as plain PyTorch gives for model.to(device)): the first lists the
    # device types; the second is torch's AssertionError "Torch not compiled with CUDA enabled"
    case("prepare on 'tpu'", lambda: mp.prepare(_linear(), None, "f16-master", device="tpu"), RuntimeError,
         ["tpu", "cpu, cuda"]),
    case("prepare on 'cuda' without CUDA", lambda: mp.prepare(_linear(), None, "f16-master", device="cuda"),
         (AssertionError, RuntimeError, ValueError), ["CUDA"], skip=None if NO_CUDA else "CUDA is available here"),
    case("step with no gradients", _step_without_gradients, RuntimeError, ["no gradients", "backward()"]),
    case("step a string", _step(optimizer="opt"), TypeError, ["'opt'", "optimizer"]),
    case("step max_grad_norm -1", _step(max_grad_norm=-1), ValueError, ["-1", "> 0", "None"]),
    case("step max_grad_norm nan", _step(max_grad_norm=math.nan), ValueError, ["nan", "> 0"]),
    case("step max_grad_norm '1'", _step(max_grad_norm="1"), TYPE_OR_VALUE, ["max_grad_norm", "'1'"]),
    case("step with scaler 'scaler'", _step(scaler="scaler"), TypeError, ["str", "LossScaler"]),
]


@pytest.mark.parametrize(("call", "error", "needles"), WRONG_TYPES)
def test_wrong_dtypes_types_and_devices(call, error, needles):
    check(call, error, needles)


# ----- the command line: one line on stderr, exit status 2, no traceback, nothing written -------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(code: int, out: str, err: str, needles: list[str]) -> None:
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


TRAIN = ["train", "--recipe", "tiny-updates", "--policy", "f32", "--steps", "2", "--no-progress"]
COMPARE = ["compare", "--recipe", "tiny-updates", "--policies", "f32", "--steps", "2", "--no-progress"]
DEMO = ["demo", "--fraction", "0.01", "--no-progress"]


def cli(argv: list[str], needles: list[str]):
    name = " ".join(argv)
    for common in (TRAIN, COMPARE, DEMO):
        name = name.replace(" ".join(common), common[0])
    return pytest.param(argv, needles, id=name)


BAD_ARGUMENTS = [
    cli(TRAIN + ["--device", "tpu"], ["--device", "'tpu'", "valid here: cpu"]),
    cli(TRAIN + ["--device", ""], ["--device", "''", "valid here: cpu"]),
    cli(TRAIN + ["--device", "cuda:99"], ["--device", "'cuda:99'", "valid here: cpu"]),
    cli(TRAIN + ["--steps", "0"], ["--steps", "'0'", "integer >= 1"]),
    cli(TRAIN + ["--steps", "-3"], ["--steps", "'-3'", "integer >= 1"]),
    cli(TRAIN + ["--steps", "ten"], ["--steps", "'ten'", "integer >= 1"]),
    cli(TRAIN + ["--checkpoint-every", "-1"], ["--checkpoint-every", "'-1'", "integer >= 0"]),
    cli(TRAIN + ["--threads", "0"], ["--threads", "'0'", "integer >= 1"]),
    cli(TRAIN + ["--seed", "-1"], ["--seed", "'-1'", "integer >= 0"]),
    cli(TRAIN + ["--seed", str(2**32)], ["--seed", "'4294967296'", "0..4294967295"]),
    cli(TRAIN + ["--stop-at", "0"], ["--stop-at", "'0'", "integer >= 1"]),
    cli(TRAIN + ["--stop-at", "9"], ["--stop-at", "got 9", "1..2"]),
    cli(TRAIN + ["--bogus"], ["unrecognized arguments: --bogus", "--help"]),
    cli(["train", "--policy", "f32"], ["--recipe", "required"]),
    cli(["train", "--recipe", "nope", "--policy", "f32"], ["'nope'", "valid: digits"]),
    cli(["train", "--recipe", "no_such_module:recipe", "--policy", "f32"], ["'no_such_module'", "No module named"]),
    cli(["train", "--recipe", "os:no_such_name", "--policy", "f32"], ["'no_such_name'", "no attribute"]),
    cli(["train", "--recipe", "os:getcwd", "--policy", "f32"], ["'os:getcwd'", "not a mixprec.recipes.Recipe"]),
    cli(["train", "--recipe", ":", "--policy", "f32"], ["':'", "module.path:object", "digits"]),
    cli(["train", "--recipe", "os:", "--policy", "f32"], ["'os:'", "module.path:object"]),
    cli(["train", "--recipe", ".relative:recipe", "--policy", "f32"], ["'.relative:recipe'", "absolute module"]),
    cli(["train", "--recipe", "missing.py:recipe", "--policy", "f32"], ["missing.py", "no such file"]),
    cli(["train", "--recipe", "tiny-updates", "--policy", "f99"], ["'f99'", "valid presets"]),
    cli(["train", "--recipe", "tiny-updates", "--policy", "params=f16,params=bf16"], ["'params'", "twice"]),
    cli(["train", "--recipe", "tiny-updates", "--policy", "f16-master,scaling=dynamic:abc"], ["'dynamic:abc'"]),
    cli(["train", "--recipe", "tiny-updates", "--policy", "f16-master,scaling=static:-1"], ["'static:-1'"]),
    # issue 15: 0.0 as float32; it used to print the run's first line and make the folder before failing
    cli(["train", "--recipe", "tiny-updates", "--policy", "f16-master,scaling=static:1e-45"], ["1e-45"]),
    cli(COMPARE + ["--policies", "f32,f16-master,scaling=static:1e39"], ["1e+39"]),
    cli(COMPARE + ["--policies", "f32,f99"], ["'f99'", "valid presets"]),
    cli(COMPARE + ["--policies", ",,"], ["',,'", "--policies f32,f16-master"]),
    cli(COMPARE + ["--policies", "f32,f32"], ["listed twice"]),
    cli(COMPARE + ["--seeds", "0"], ["--seeds", "got 0", ">= 1"]),
    cli(COMPARE + ["--device", "tpu"], ["--device", "'tpu'", "valid here: cpu"]),
    cli(COMPARE + ["--threads", "0"], ["--threads", "'0'"]),
    cli(DEMO + ["--fraction", "0"], ["--fraction", "0.0", "(0, 1]"]),
    cli(DEMO + ["--fraction", "nan"], ["--fraction", "nan", "(0, 1]"]),
    cli(DEMO + ["--fraction", "half"], ["--fraction", "'half'"]),
    cli(DEMO + ["--device", "tpu"], ["--device", "'tpu'", "valid here: cpu"]),
    cli(DEMO + ["--threads", "-1"], ["--threads", "'-1'"]),
    cli(["policies", "params=f16,params=bf16"], ["'params'", "twice"]),
    cli(["policies", "scaling=static:0"], ["'static:0'", "positive"]),
    cli(["policies", ""], ["empty policy string", "f16-master"]),
    cli(["formats", "--bogus"], ["--bogus"]),
    cli(["bogus"], ["'bogus'", "formats", "train"]),
]


@pytest.mark.parametrize(("argv", "needles"), BAD_ARGUMENTS)
def test_bad_cli_arguments_are_one_line_and_write_nothing(argv, needles, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default run folder would land here: none must
    out = tmp_path / "out"
    argv = argv + (["--out", str(out)] if argv[0] in ("train", "compare", "demo") else [])
    code, stdout, err = run_cli(argv, capsys)
    assert_usage_error(code, stdout, err, needles)
    assert stdout == "" and list(tmp_path.iterdir()) == []


def test_no_command_prints_the_help_and_one_line_on_stderr(capsys):
    code, out, err = run_cli([], capsys)
    assert_usage_error(code, out, err, ["no command given", "formats, policies, train"])
    assert "usage: mixprec" in out


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="this torch build has CUDA")
@pytest.mark.parametrize("command", [TRAIN, COMPARE, DEMO], ids=["train", "compare", "demo"])
def test_device_cuda_on_a_cpu_build_says_so_and_lists_the_devices(command, tmp_path, capsys):
    code, out, err = run_cli(command + ["--device", "cuda", "--out", str(tmp_path / "out")], capsys)
    assert_usage_error(code, out, err, ["'cuda'", "CUDA is not available in this torch build", "valid here: cpu"])
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_device_cuda_passes_where_there_is_one():
    from mixprec.cli import device_name

    assert device_name("cuda") == "cuda" and device_name("cuda:0") == "cuda:0" and device_name("cpu") == "cpu"


def test_checkpoint_every_0_means_only_at_the_end(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "0: only at the end" in " ".join(capsys.readouterr().out.split())
    out = tmp_path / "run"
    three_steps = [a if a != "2" else "3" for a in TRAIN]  # --steps once: a repeated option is refused
    assert main(three_steps + ["--checkpoint-every", "0", "--out", str(out)]) == 0
    assert [step for step, _ in list_checkpoints(out)] == [3]  # -1 used to checkpoint every step


# ----- unreadable or unwritable paths -----------------------------------------------------------------------


@pytest.mark.parametrize("command", [TRAIN, COMPARE, DEMO], ids=["train", "compare", "demo"])
def test_out_under_a_file(command, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    out = tmp_path / "a-file" / "run"
    code, stdout, err = run_cli(command + ["--out", str(out)], capsys)
    assert_usage_error(code, stdout, err, ["cannot write to output folder", str(out), "--out"])


def test_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("not a folder")
    code, stdout, err = run_cli(TRAIN + ["--out", str(out)], capsys)
    assert_usage_error(code, stdout, err, ["cannot write to output folder", str(out)])
    assert out.read_text() == "not a folder"


@pytest.mark.skipif(AS_ROOT, reason="as root, chmod does not stop writes")
def test_out_in_an_unwritable_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, stdout, err = run_cli(TRAIN + ["--out", str(locked / "run")], capsys)
    finally:
        locked.chmod(0o755)
    assert_usage_error(code, stdout, err, ["cannot write to output folder", str(locked / "run"), "--out"])


def test_recipe_file_that_is_a_folder(tmp_path, capsys):
    (tmp_path / "tasks.py").mkdir()
    code, stdout, err = run_cli(["train", "--recipe", f"{tmp_path}/tasks.py:recipe", "--policy", "f32"], capsys)
    assert_usage_error(code, stdout, err, ["tasks.py is a folder, not a Python file"])


@pytest.mark.skipif(AS_ROOT, reason="as root, chmod does not stop reads")
def test_recipe_file_that_cannot_be_read(tmp_path, capsys):
    tasks = tmp_path / "tasks.py"
    tasks.write_text("recipe = None\n")
    tasks.chmod(0o000)
    try:
        code, stdout, err = run_cli(["train", "--recipe", f"{tasks}:recipe", "--policy", "f32"], capsys)
    finally:
        tasks.chmod(0o644)
    assert_usage_error(code, stdout, err, [str(tasks)])


# ----- the real entry point: no traceback reaches the user --------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["train", "--recipe", "tiny-updates", "--policy", "f32", "--device", "cuda" if NO_CUDA else "cuda:99"],
    ["train", "--recipe", "tiny-updates", "--policy", "params=f16,params=bf16", "--steps", "1"],
], ids=["device", "policy"])
def test_python_m_mixprec_prints_one_line_and_exits_2(argv, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mixprec", *argv, "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "" and not (tmp_path / "run").exists()


def test_the_corpus_counts():
    """docs/reliability.md quotes the number of cases: keep it true."""
    tables = (POLICY_STRINGS, SCALER_ARGUMENTS, STATE_DICTS, WRONG_TYPES, BAD_ARGUMENTS)
    assert sum(map(len, tables)) >= 140, [len(t) for t in tables]
