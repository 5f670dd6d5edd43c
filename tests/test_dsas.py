"""DSAS gates: fit on synthetic data with a known answer, folding, policies, bad data."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from steerwise.gates import DSASGate, DSASOptions, StepContext, layer_scale
from steerwise.maps import CAAMap


def separable(n=40, d=16, shift=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(d)
    direction[3] = 1.0
    control = torch.randn(n, d, generator=g)
    source = torch.randn(n, d, generator=g) + shift * direction
    return source, control, direction


def test_gate_reaches_high_accuracy_and_fires_on_source_only():
    source, control, _ = separable()
    gate, acc = DSASGate.fit(source, control)
    assert acc >= 0.9
    new_s, new_c, _ = separable(seed=1)
    ctx = StepContext()
    assert gate(new_s, ctx).mean() > 0.8
    assert gate(new_c, ctx).mean() < 0.2


@pytest.mark.parametrize("whiten", [False, True])
def test_folded_gate_equals_the_sklearn_pipeline(whiten):
    source, control, _ = separable()
    gate, _ = DSASGate.fit(source, control, DSASOptions(whiten=whiten))
    x = torch.cat([source, control]).double().numpy()
    y = np.r_[np.ones(len(source)), np.zeros(len(control))]
    pipe = make_pipeline(PCA(5, whiten=whiten, random_state=0), LogisticRegression(max_iter=2000))
    expected = pipe.fit(x, y).predict_proba(x)[:, 1]
    got = gate(torch.cat([source, control]), StepContext()).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_gate_works_per_token_on_3d_activations():
    source, control, _ = separable()
    gate, _ = DSASGate.fit(source, control)
    tokens = torch.stack([source[:5], control[:5]])  # (batch 2, tokens 5, d)
    g = gate(tokens, StepContext())
    assert g.shape == (2, 5)
    assert (g[0] > g[1]).all()


def test_threshold_and_adaptive_policies():
    assert layer_scale(0.9, DSASOptions()) == (1.0, False)
    assert layer_scale(0.6, DSASOptions()) == (0.0, False)
    assert layer_scale(0.6, DSASOptions(below_threshold="constant")) == (1.0, True)
    scale, const = layer_scale(0.8, DSASOptions(adaptive=True))
    assert scale == pytest.approx(0.6) and not const
    assert layer_scale(0.4, DSASOptions(adaptive=True))[0] == 0.0
    gate = DSASGate(torch.ones(3), torch.zeros(()), constant=True)
    assert gate(torch.randn(2, 3), StepContext()) is None


def test_bad_data_gives_clear_errors():
    source, control, _ = separable()
    with pytest.raises(ValueError, match="non-empty"):
        DSASGate.fit(source[:0], control)
    with pytest.raises(ValueError, match="too little data.*3 source"):
        DSASGate.fit(source[:3], control)
    bad = source.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        DSASGate.fit(bad, control)
    with pytest.raises(ValueError, match="widths differ"):
        DSASGate.fit(source, control[:, :8])


def test_caa_recovers_a_known_mean_shift():
    g = torch.Generator().manual_seed(0)
    shift = torch.randn(8, generator=g)
    source = torch.randn(500, 8, generator=g)
    target = torch.randn(500, 8, generator=g) + shift
    v = CAAMap.fit(source, target).vector
    assert torch.allclose(v, target.mean(0) - source.mean(0))
    assert (v - shift).norm() < 0.25 * shift.norm()
