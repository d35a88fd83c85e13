"""Policy: presets, the string form (round-trip), rules, resolution per module, explain, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixprec as mp
from mixprec.policy import Policy, Rule

NAMED = [mp.F32, mp.F16, mp.BF16, mp.E4M3, mp.E5M2, mp.Format.parse("e3m4")]


def test_presets_have_descriptions_and_parse():
    assert {"f32", "f16-mixed", "bf16-mixed", "f16-master", "bf16-master", "f16-pure", "bf16-pure"} <= set(
        mp.PRESETS)
    for name, description in mp.PRESETS.items():
        assert isinstance(description, str) and description and "\n" not in description
        policy = Policy.parse(name)
        assert str(policy) == name  # a preset prints as its name
        assert Policy.parse(str(policy)) == policy


def test_presets_follow_the_paper_and_torch_amp():
    paper = Policy.parse("f16-master")
    assert (paper.params, paper.compute, paper.output, paper.master, paper.scaling) == (
        mp.F16, mp.F16, mp.F32, mp.F32, "dynamic")
    amp = Policy.parse("f16-mixed")
    assert (amp.params, amp.compute, amp.master, amp.scaling) == (mp.F32, mp.F16, None, "dynamic")
    assert Policy.parse("bf16-mixed").scaling == "none"
    for pure in ("f16-pure", "bf16-pure"):
        assert Policy.parse(pure).master is None and Policy.parse(pure).scaling == "none"
    assert Policy.parse("f16-master-noscale") == paper.replace(scaling="none")


def test_key_value_form_and_overrides():
    p = Policy.parse("params=f16, compute=half, output=float32, master=f32, scaling=static:1024.0")
    assert p == Policy(params=mp.F16, compute=mp.F16, master=mp.F32, scaling="static:1024")
    assert p.scaling == "static:1024"  # canonical form, so that equal choices compare equal
    q = Policy.parse("f16-master,rule=lm_head:fp32,rule=type:Embedding:bf16/fp32,execution=emulated")
    assert q.rules == (Rule("lm_head", mp.F32), Rule("type:Embedding", mp.BF16, mp.F32))
    assert q.execution == "emulated" and q.master == mp.F32
    assert Policy.parse(str(q)) == q


rules = st.builds(
    Rule,
    match=st.sampled_from(["lm_head", "type:*Norm", "name:encoder.layer.?.*", "*attn*", "Embedding"]),
    compute=st.sampled_from(NAMED),
    params=st.none() | st.sampled_from(NAMED),
)


@st.composite
def policies(draw):
    params = draw(st.sampled_from(NAMED))
    master = None if params == mp.F32 else draw(st.sampled_from([None, mp.F32]))
    scaling = draw(st.sampled_from(["none", "dynamic"]) | st.builds(
        lambda kind, s: f"{kind}:{s}", st.sampled_from(["static", "dynamic"]),
        st.floats(min_value=2.0**-10, max_value=2.0**30, allow_nan=False)))
    return Policy(params=params, compute=draw(st.sampled_from(NAMED)), output=draw(st.sampled_from(NAMED)),
                  master=master, scaling=scaling, execution=draw(st.sampled_from(mp.policy.EXECUTIONS)),
                  rules=tuple(draw(st.lists(rules, max_size=3))))


@settings(max_examples=200, deadline=None)
@given(policies())
def test_string_form_round_trips(policy):
    assert Policy.parse(str(policy)) == policy
    assert Policy.parse(str(policy)).scaling == policy.scaling


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError) as error:
        Policy.parse("f16-masters")
    message = str(error.value)
    assert "'f16-masters'" in message and all(name in message for name in mp.PRESETS)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError) as error:
        Policy.parse("f16-master,precision=f16")
    message = str(error.value)
    assert "precision=f16" in message
    assert all(k in message for k in ("params", "compute", "output", "master", "scaling", "execution", "rule"))


@pytest.mark.parametrize("text, fragment", [
    ("params=f17", "unknown format"),
    ("f16-master,scaling=sometimes", "unknown loss scaling"),
    ("f16-master,scaling=static:-4", "positive"),
    ("f16-master,scaling=static", "unknown loss scaling"),
    ("f16-master,execution=gpu", "execution must be one of"),
    ("params=f32,master=f32", "master=none"),
    ("params=f16,master=bf16", "master weights are fp32"),
    ("f16-master,rule=lm_head", "MATCH:COMPUTE"),
    ("", "empty policy"),
])
def test_bad_values_say_what_is_valid(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        Policy.parse(text)


def test_preset_only_first():
    with pytest.raises(ValueError, match="preset name may only come first"):
        Policy.parse("params=f16,f16-master")


def _toy() -> torch.nn.Module:
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    return torch.nn.Sequential(torch.nn.Embedding(10, 4), block, torch.nn.BatchNorm1d(4),
                               torch.nn.Linear(4, 3), torch.nn.Softmax(-1))


def test_module_precisions_defaults_rules_and_inheritance():
    p = Policy.parse("f16-master,rule=0:fp32,rule=1:bf16,rule=3:fp32/fp16")
    got = {m.name: (m.params, m.compute, m.reason) for m in p.module_precisions(_toy())}
    assert got[""] == (mp.F16, mp.F16, "policy default")
    assert got["0"] == (mp.F32, mp.F32, "rule 1 (0:fp32)")  # an FP32 rule keeps params in FP32
    assert got["1"] == (mp.F16, mp.BF16, "rule 2 (1:bf16)")  # params follow the policy otherwise
    assert got["1.0"] == (mp.F16, mp.BF16, "rule 2 (1:bf16) via parent")  # children inherit a rule
    assert got["1.1"] == (mp.F32, mp.F32, "default fp32 island (LayerNorm)")  # ... but not over islands
    assert got["2"] == (mp.F32, mp.F32, "default fp32 island (BatchNorm1d)")
    assert got["3"] == (mp.F16, mp.F32, "rule 3 (3:fp32/fp16)")
    assert got["4"] == (mp.F32, mp.F32, "default fp32 island (Softmax)")


def test_first_matching_rule_wins_and_rules_beat_islands():
    p = Policy.parse("f16-pure,rule=type:LayerNorm:bf16,rule=*:fp32")
    got = {m.name: (m.compute, m.reason) for m in p.module_precisions(_toy())}
    assert got["1.1"] == (mp.BF16, "rule 1 (type:LayerNorm:bf16)")
    assert got["1.0"][1] == "rule 2 (*:fp32)"


def test_rule_matches_type_name_base_classes_and_qualified_name():
    class MyNorm(torch.nn.LayerNorm):
        pass

    module = MyNorm(3)
    assert Rule("LayerNorm").matches("x", module)  # a base class's name
    assert Rule("type:My*").matches("x", module) and not Rule("name:My*").matches("x", module)
    assert Rule("name:enc.*.ln").matches("enc.3.ln", module) and not Rule("type:enc.*").matches("enc.3.ln", module)


def test_rule_matching_nothing_warns_with_its_name():
    p = Policy.parse("f16-master,rule=lm_head:fp32,rule=type:LayerNorm:fp32")
    with pytest.warns(UserWarning, match="'lm_head:fp32'") as record:
        p.explain(_toy())
    assert len(record) == 1  # the rule that matched stays quiet


def test_explain_table():
    text = Policy.parse("f16-master,rule=3:fp32").explain(_toy())
    lines = text.splitlines()
    assert lines[0] == "policy params=fp16,compute=fp16,output=fp32,master=fp32,reduce=fp32,scaling=dynamic," \
                       "execution=auto,rule=3:fp32: execution emulated (per op) on cpu, loss scaling dynamic, " \
                       "output fp32, reduce fp32, 6 B a fp16 weight with its master"
    rows = {line.split()[0]: line.split(None, 6) for line in lines[2:]}
    assert rows["0"][1:6] == ["Embedding", "fp16", "float32", "fp16", "fp32"]
    assert rows["0"][6] == "policy default"
    assert rows["1.1"][1:6] == ["LayerNorm", "fp32", "float32", "fp32", "-"]
    assert rows["1.1"][6] == "default fp32 island (LayerNorm)"
    assert rows["2"][6] == "default fp32 island (BatchNorm1d)"
    assert rows["3"][1:7] == ["Linear", "fp32", "float32", "fp32", "-", "rule 1 (3:fp32)"]
    assert rows["4"][1:6] == ["Softmax", "-", "-", "fp32", "-"]  # a param-less island is listed too
    assert "(root)" not in rows  # containers without parameters are not


def test_resolve_execution():
    assert Policy.parse("f32").resolve_execution("cpu") == "native"
    assert Policy.parse("f16-master").resolve_execution("cpu") == "emulated"
    assert Policy.parse("f16-master,execution=native").resolve_execution("cpu") == "native"
    assert Policy.parse("params=e4m3,compute=e4m3").resolve_execution("cuda") == "emulated"
    if torch.cuda.is_available():
        assert Policy.parse("f16-master").resolve_execution("cuda") == "native"
    with pytest.raises(ValueError, match="e4m3 has no native support.*execution=emulated"):
        Policy.parse("params=e4m3,compute=e4m3,execution=native").resolve_execution("cpu")


def test_make_scaler():
    assert type(Policy.parse("f16-pure").make_scaler()).__name__ == "NoScaler"
    static = Policy.parse("f16-master,scaling=static:512").make_scaler()
    assert type(static).__name__ == "StaticScaler" and static.loss_scale == 512.0
    dynamic = Policy.parse("f16-master,scaling=dynamic:1024").make_scaler("cpu")
    assert type(dynamic).__name__ == "DynamicScaler" and dynamic.loss_scale == 1024.0
    assert Policy.parse("f16-master").make_scaler().loss_scale == 2.0**16


def test_constructor_accepts_names_and_is_frozen():
    p = Policy(params="bf16", compute="bf16", master="f32", rules=["lm_head:fp32"])
    assert p == Policy.parse("bf16-master,rule=lm_head:fp32")
    with pytest.raises(AttributeError):
        p.params = mp.F16  # type: ignore[misc]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hash(p) == hash(Policy.parse(str(p)))


def test_cli_policies_lists_presets(capsys):
    import json

    from mixprec.cli import main

    assert main(["policies", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(mp.PRESETS)
    assert rows["f16-master"]["master"] == "fp32" and rows["f16-mixed"]["params"] == "fp32"
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in mp.PRESETS) and max(len(line) for line in out.splitlines()) <= 80
    assert main(["policies", "f16-master,rule=lm_head:fp32"]) == 0
    assert "rule 1: lm_head:fp32" in capsys.readouterr().out
    assert main(["policies", "f16-masterr"]) == 2
    assert "valid presets: f32, f16-mixed" in capsys.readouterr().err


def test_scaling_left_out_is_dynamic_for_narrow_range_formats_and_none_otherwise():
    # The API contract's spelling of the paper's recipe (a policy string with no scaling key) means the paper's
    # recipe, loss scaling included.
    assert mp.Policy.parse("params=f16,compute=f16,output=f32,master=f32") == mp.Policy.parse("f16-master")
    assert mp.Policy.parse("params=bf16,compute=bf16,master=f32") == mp.Policy.parse("bf16-master")
    assert mp.Policy.parse("compute=e4m3").scaling == "dynamic"
    assert mp.Policy.parse("params=f16,compute=f16,scaling=none") == mp.Policy.parse("f16-pure")
    assert "scaling=dynamic" in str(mp.Policy(compute="e5m2"))  # the string names the resolved choice


@pytest.mark.parametrize("text, reduce", [
    ("f16-master", mp.F32), ("bf16-master", mp.F32), ("f16-mixed", mp.F32), ("f32", mp.F32),
    ("f16-pure", None), ("bf16-pure", None), ("f16-master,reduce=bf16", mp.BF16),
    ("f16-master,reduce=storage", None), ("f16-pure,master=fp32", mp.F32),  # auto follows the override
])
def test_reduce_key_defaults_to_fp32_with_masters_and_round_trips(text, reduce):
    policy = mp.Policy.parse(text)
    assert policy.reduce == reduce
    assert mp.Policy.parse(str(policy)) == policy
    assert f"reduce {'storage' if reduce is None else reduce.name}" in policy.explain(torch.nn.Linear(2, 2))


def test_unknown_reduce_format_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown format"):
        mp.Policy.parse("f16-master,reduce=fp12")


def test_a_dynamic_initial_scale_above_the_default_ceiling_makes_a_scaler():
    scaler = mp.Policy.parse(f"f16-master,scaling=dynamic:{2**40}").make_scaler()
    assert scaler.loss_scale == 2.0**40 and scaler.max_scale == 2.0**40
    assert mp.Policy.parse("f16-master,scaling=dynamic:1024").make_scaler().max_scale == 2.0**24


def test_a_dynamic_initial_scale_below_the_floor_lowers_the_floor():
    # Issue 20 (5): it parsed, then prepare raised "init_scale (0.5) must lie in [1.0, ...]".
    policy = mp.Policy.parse("f16-master,scaling=dynamic:0.5")
    assert mp.Policy.parse(str(policy)) == policy
    model = torch.nn.Linear(2, 2)
    model, opt, scaler = mp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), policy)
    assert scaler.loss_scale == 0.5 and scaler.min_scale == 0.5


@pytest.mark.parametrize("match", [" x", "x ", "\tlm_head", "x\n"])
def test_a_rule_whose_match_a_policy_string_would_strip_is_refused(match):
    # Issue 20 (16): Rule(" x") did not round-trip through str/parse.
    with pytest.raises(ValueError, match="must not start or end with whitespace.*use 'x'|use 'lm_head'"):
        mp.Rule(match, mp.F32)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12),
       st.sampled_from(["fp32", "fp16", "bf16"]))
def test_every_rule_a_user_can_build_round_trips_through_the_policy_string(match, compute):
    try:
        rule = mp.Rule(match, compute)
    except ValueError:
        return  # refused up front, with what to write instead
    policy = mp.Policy.parse("bf16-master").replace(rules=(rule,))
    assert mp.Policy.parse(str(policy)) == policy, str(policy)
