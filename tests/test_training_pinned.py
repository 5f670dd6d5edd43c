"""End-to-end training (LinEAS maps, E2E gates) gives the numbers it gave before the trainer
moved (issue 19): the values below were computed with steerwise at 59ea37a (same seeds, one
thread), before the E2E options and trainer moved next to the gate, and before fitted statistics
left the first token out: so the fits here keep it in (``sink_free=False``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import make_model, make_tokenizer
from test_methods import CONTROL, SOURCE, TARGET, make_wide_model, quick
from threadpoolctl import threadpool_limits

from steerwise.fit import fit

PINNED = {
    "lineas-none": {'w2_initial': 0.0002133238158421591, 'w2_final': 0.00011471744073787704,
                    'loss_first_10': 0.00030851939518470315, 'loss_last_10': 0.000216999975964427,
                    'maps': 94.337873929122, 'gates': 0.0},
    "caa-e2e-relu": {'w2_initial': 43.84710375467936, 'w2_final': 26.22546641031901,
                     'loss_first_10': 72.42929267883301, 'loss_last_10': 72.42929267883301,
                     'maps': 281.62932908535004, 'gates': 9.893672868027352},
    "lineas-e2e-sigmoid": {'w2_initial': 18.085131645202637, 'w2_final': 9.576760292053223,
                           'loss_first_10': 22.028204250335694,
                           'loss_last_10': 22.028204250335694,
                           'maps': 103.65266707574483, 'gates': 10.454207989620045},
}


def _case(name: str):
    """(model, fit option fields) of each pinned case; the E2E options are set by name so the test
    reads the same whichever dataclass holds them."""
    if name == "lineas-none":
        return make_model("qwen2"), {
            "method": "lineas", "gate": "none",
            "lineas": {"steps": 12, "lr": 3e-2, "batch_size": 4, "seed": 5, "l1": 0.5}}
    if name == "caa-e2e-relu":
        return make_wide_model(), {
            "method": "caa", "gate": "e2e",
            "lineas": {"steps": 10, "lr": 5e-2, "batch_size": 4, "seed": 2},
            "e2e": {"gamma": 1.0, "activation": "relu", "init": "dsas"}}
    return make_wide_model(), {
        "method": "lineas", "gate": "e2e",
        "lineas": {"steps": 10, "lr": 5e-2, "batch_size": 3, "seed": 1},
        "e2e": {"gamma": 0.5, "activation": "sigmoid", "init": "zero"}}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_end_to_end_training_matches_the_pinned_numbers(name):
    model, spec = _case(name)
    opts = quick(method=spec["method"], gate=spec["gate"], sink_free=False, default_strength=1.0)
    opts.lineas = replace(opts.lineas, **spec["lineas"])
    if "e2e" in spec:
        opts.e2e = replace(opts.e2e, **spec["e2e"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            r = fit(model, make_tokenizer(), SOURCE, CONTROL, TARGET, opts, progress=False)
    finally:
        torch.set_num_threads(before)
    info = r.fit_info["training"]
    got = {k: info[k] for k in ("w2_initial", "w2_final", "loss_first_10", "loss_last_10")}
    got["maps"] = float(sum(p.double().abs().sum() for e in r.entries
                            for p in e.map.state_dict().values()))
    got["gates"] = float(sum(p.double().abs().sum() for e in r.entries
                             for p in e.gate.state_dict().values()))
    assert got == pytest.approx(PINNED[name], rel=1e-6, abs=1e-12)
