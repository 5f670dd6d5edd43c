"""Issue 19: declared map/gate contracts, typed options, registries, one source for options."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import torch
from conftest import make_model, make_tokenizer

from steerwise.fit import FitOptions, _options, fit
from steerwise.gates import GATE_FITTERS, GATE_REGISTRY, DSASOptions, gate_kinds
from steerwise.gates.base import Gate, GateFitter, NoGate, register_gate, register_gate_fitter
from steerwise.maps import MAP_REGISTRY, CAAMap, ITIMap, LinearActMap, SteeringMap, register_map

FRUIT = ["apple pear banana fruit", "sweet ripe apple", "banana fruit sweet", "ripe pear apple",
         "fruit apple banana ripe", "pear sweet fruit"]
OTHER = ["car bus train road", "dog cat bird animal", "rain snow sun cold", "fast wheel road car",
         "bird runs dog sleeps", "cold rain sky"]


# ---- typed map options -------------------------------------------------------------------------
def test_a_misspelt_map_option_is_refused_naming_the_right_one():
    with pytest.raises(ValueError, match=r"'top_k_head' \(did you mean top_k_heads\?\)"):
        fit(make_model("gpt2"), make_tokenizer(), FRUIT, OTHER, method="iti", gate="none",
            map_options={"top_k_head": 3}, progress=False)
    with pytest.raises(ValueError, match="support_quantile"):
        LinearActMap.fit(torch.randn(6, 3), torch.randn(6, 3), support_quantile=(0.1, 0.9))
    with pytest.raises(ValueError, match=r"unknown option of map 'caa': 'seed'; known: none"):
        CAAMap.fit(torch.randn(6, 3), torch.randn(6, 3), seed=0)


def test_map_options_accept_a_dict_an_instance_or_keywords():
    o = ITIMap.options({"top_k_heads": 3}, seed=2)
    assert (o.top_k_heads, o.seed, o.cv_folds) == (3, 2, 5)
    assert ITIMap.options(o) is o
    s, t = torch.randn(8, 4), torch.randn(8, 4) + 1
    a = LinearActMap.fit(s, t, {"support": False})
    b = LinearActMap.fit(s, t, LinearActMap.options(support=False))
    assert torch.equal(a.omega, b.omega) and not a.support and not b.support


def test_every_map_and_gate_kind_declares_its_options_as_a_dataclass():
    for cls in MAP_REGISTRY.values():
        assert dataclasses.is_dataclass(cls.Options), cls
        cls.Options()  # every option has a default
    for fitter in GATE_FITTERS.values():
        assert dataclasses.is_dataclass(fitter.Options), fitter
        if fitter.options_field is not None:
            assert isinstance(getattr(FitOptions(), fitter.options_field), fitter.Options)


def test_base_classes_state_the_optional_methods_with_defaults():
    class Bare(SteeringMap):
        method = "bare-test"

    assert Bare.end_to_end is False and Bare.finalize([], None) == {}
    assert Bare().active_dims() is None and Bare().config() == {}
    assert Bare.adapt_options(Bare.options(), None, "residual") == Bare.options()
    with pytest.raises(NotImplementedError, match="bare-test"):
        Bare.fit(torch.zeros(2, 2), torch.zeros(2, 2))
    assert NoGate().link([]) is None
    g = GateFitter()
    assert g.poolings(FitOptions()) == set() and g.cv_folds(FitOptions()) == 2
    assert g.calibrate(None, None) is None


# ---- registries --------------------------------------------------------------------------------
def test_registries_refuse_a_second_class_under_a_taken_name():
    with pytest.raises(ValueError, match="map method 'caa' is already registered"):
        @register_map
        class OtherCAA(CAAMap):
            method = "caa"

    assert MAP_REGISTRY["caa"] is CAAMap
    with pytest.raises(ValueError, match="gate 'dsas' is already registered"):
        @register_gate
        class OtherDSAS(Gate):
            kind = "dsas"
    with pytest.raises(ValueError, match="gate fitter 'cast' is already registered"):
        @register_gate_fitter
        class OtherCAST(GateFitter):
            kind = "cast"
    assert register_map(CAAMap) is CAAMap  # the same class again is harmless (a reload)


def test_gate_kinds_do_not_depend_on_the_import_order():
    code = ("import importlib, sys; mods = sys.argv[1].split(','); "
            "[importlib.import_module('steerwise.gates.' + m) for m in mods]; "
            "from steerwise.gates import gate_kinds; print(','.join(gate_kinds()))")
    outs = {subprocess.run([sys.executable, "-c", code, order], capture_output=True, text=True,
                           check=True).stdout.strip()
            for order in ("e2e,cast,dsas", "dsas,cast,e2e", "cast,e2e,dsas")}
    assert len(outs) == 1
    kinds = outs.pop().split(",")
    assert kinds[0] == "none" and kinds[1:] == sorted(kinds[1:])
    assert {"none", "dsas", "dsas-adaptive", "cast", "e2e"} <= set(kinds)
    assert gate_kinds()[0] == "none" and set(gate_kinds()) == set(GATE_FITTERS)
    assert set(GATE_REGISTRY) >= {"none", "dsas", "cast", "e2e"}


# ---- FitOptions ----------------------------------------------------------------------------------
def test_fit_options_are_never_changed_by_a_fit():
    opts = FitOptions(method="iti", dsas=DSASOptions(cv_folds=3), map_options={"top_k_heads": 2})
    before = dataclasses.asdict(opts)
    got = _options(opts, {"gate": "none", "dsas": {"threshold": 0.5}})
    assert dataclasses.asdict(opts) == before
    assert got is not opts and got.gate == "none" and got.dsas.threshold == 0.5
    assert got.dsas.cv_folds == 3 and got.dsas is not opts.dsas
    assert got.map_options == {"top_k_heads": 2} and got.map_options is not opts.map_options
    fit(make_model("gpt2"), make_tokenizer(), FRUIT, OTHER, options=opts, gate="none",
        layers="1", site="heads", progress=False)
    assert dataclasses.asdict(opts) == before


def test_fit_options_updated_checks_sections_and_reads_the_old_e2e_keys():
    opts = FitOptions().updated({"lineas": {"steps": 5, "e2e_gate": "relu", "gamma": 0.5}})
    assert opts.lineas.steps == 5 and opts.e2e.activation == "relu" and opts.e2e.gamma == 0.5
    with pytest.raises(ValueError, match=r"'threshld' \(did you mean threshold\?\)"):
        FitOptions().updated({"dsas": {"threshld": 0.5}})
    with pytest.raises(TypeError, match=r"unknown fit option 'gates' \(did you mean gate\?\)"):
        _options(None, {"gates": "none"})
    with pytest.raises(ValueError, match="gate 'dsas' takes its options from FitOptions.dsas"):
        fit(make_model("gpt2"), make_tokenizer(), FRUIT, OTHER, gate_options={"whiten": True},
            progress=False)


# ---- the command line comes from the dataclasses -----------------------------------------------
def _help() -> str:
    from steerwise.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command").choices["fit"]
    return sub.format_help()


def test_fit_help_lists_every_declared_option_with_its_default():
    from steerwise.cli import _fit_sections, _map_option_fields
    from steerwise.options import flag_of

    text = " ".join(_help().split())
    text = text[text.index("options: "):]  # the option list, not the usage line
    classes = [FitOptions] + [cls for _, cls, _ in _fit_sections()]
    fields = [(f, getattr(cls(), f.name)) for cls in classes for f in dataclasses.fields(cls)
              if f.metadata.get("cli")]
    fields += [(f, f.default) for f, _ in _map_option_fields().values()]
    assert len(fields) >= 28
    for f, default in fields:
        flag = flag_of(f)
        assert re.search(re.escape(flag) + r"\b", text), flag
        if default is None or isinstance(default, bool):
            continue  # the help says what happens (None) / a switch (bool)
        after = text[text.index(flag + " "):]
        assert f"(default: {default})" in after[:600], (flag, default)


def test_fit_flags_build_the_same_options_as_the_dataclass_defaults():
    from steerwise.cli import build_parser, fit_options_from_args

    args = build_parser().parse_args(["fit", "--source", "s.txt", "--out", "r"])
    opts = fit_options_from_args(args)
    want = FitOptions(map_options={})
    assert dataclasses.asdict(opts) == dataclasses.asdict(want)
    args = build_parser().parse_args(["fit", "--source", "s", "--out", "r", "--method", "iti",
                                      "--seed", "3", "--cv-folds", "4", "--e2e-gate", "relu",
                                      "--top-k-heads", "7", "--no-support"][:-1])
    opts = fit_options_from_args(args)
    assert opts.map_options == {"top_k_heads": 7, "seed": 3}
    assert (opts.dsas.seed, opts.lineas.seed, opts.cast.seed) == (3, 3, 3)
    assert (opts.dsas.cv_folds, opts.cast.cv_folds) == (4, 4) and opts.e2e.activation == "relu"
    args = build_parser().parse_args(["fit", "--source", "s", "--out", "r", "--top-k-heads", "7"])
    with pytest.raises(ValueError, match="--top-k-heads is an option of iti, not of method 'caa'"):
        fit_options_from_args(args)
