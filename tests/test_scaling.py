"""Learned activation scaling: interventions, hooks, objective, training, recipes."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import FAMILIES, VOCAB_WORDS, make_model, make_tokenizer
from steerwise.recipe import Recipe, RecipeMismatchError
from steerwise.scaling import (
    INTERVENTIONS,
    PromptTooLongError,
    ScaleOptions,
    ScaleRecipe,
    ScalingHandle,
    effectiveness_term,
    encode_examples,
    evaluate_scaling,
    faithfulness_term,
    fit_scaling,
    make_intervention,
    scaling_objective,
    scaling_sites,
)
from steerwise.scaling.data import answer_logits
from steerwise.tasks.base import TaskExample

METHODS = sorted(INTERVENTIONS)
IDS = torch.tensor([[5, 9, 12, 7, 20, 3]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _random_params(iv, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in iv.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return iv


def _intervention(model, method, kinds=("attn", "mlp", "residual"), n_positions=6):
    sites = scaling_sites(model, kinds)
    return make_intervention(method, sites, model.config.hidden_size, n_positions=n_positions)


# ---- interventions at init and their exact form ---------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero_initialised_intervention_is_the_unsteered_model(family):
    model = make_model(family)
    base = _logits(model)
    for method in METHODS:
        iv = _intervention(model, method)
        for beta in (1.0, -2.5):
            with ScalingHandle(model, iv, beta):
                assert torch.equal(_logits(model), base)
        _random_params(iv)
        with ScalingHandle(model, iv, 1.0):
            steered = _logits(model)
        with ScalingHandle(model, iv, 0.0):  # β = 0 is the identity, whatever the parameters
            assert torch.equal(_logits(model), base)
        assert not torch.allclose(steered, base, atol=1e-5)
    assert torch.equal(_logits(model), base)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bf16_model_is_intervened_and_keeps_its_dtype():
    model = make_model("qwen2", dtype=torch.bfloat16)
    iv = _random_params(_intervention(model, "activscalar", ("mlp",)))
    base = _logits(model)
    with ScalingHandle(model, iv, 1.0):
        out = model(input_ids=IDS).logits
    assert out.dtype == torch.bfloat16
    assert not torch.allclose(out.float(), base)


def test_hooks_removed_when_body_raises():
    model = make_model("llama")
    iv = _random_params(_intervention(model, "steervec"))
    with pytest.raises(RuntimeError, match="boom"):
        with ScalingHandle(model, iv, 1.0):
            _logits(model)
            raise RuntimeError("boom")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("method", METHODS)
def test_each_intervention_computes_its_formula(method):
    model = make_model("llama")
    sites = scaling_sites(model, ("mlp",))
    module = model.get_submodule(sites[1].module)
    iv = _random_params(make_intervention(method, sites, 32, n_positions=8), seed=3)
    for beta in (1.0, -1.0, 0.5):
        seen = {}
        with ScalingHandle(model, iv, beta):
            # registered after the intervention's hooks: sees the input and the intervened output
            hooks = [
                module.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone())),
                module.register_forward_hook(lambda m, a, o: seen.setdefault("out", o.clone())),
            ]
            _logits(model)  # 6 tokens: parameter columns 2..7 of 8 positions
            for h in hooks:
                h.remove()
        with torch.no_grad():
            raw = module(seen["x"])  # the MLP's own output on the same (upstream-steered) input
            if method == "activscalar":
                want = raw * (1 + beta * iv.alpha[1, 2:]).view(1, -1, 1)
            elif method == "steervec":
                want = raw + beta * iv.vectors[1, 2:].unsqueeze(0)
            else:
                alpha = raw @ iv.weight[1] + iv.offset[1]
                want = raw * (1 + beta * alpha).unsqueeze(-1)
        torch.testing.assert_close(seen["out"], want, rtol=1e-5, atol=1e-6)


def test_positions_align_at_the_end_and_padding_matches_rows_alone():
    model = make_model("llama")
    iv = _random_params(_intervention(model, "activscalar", ("attn", "mlp"), n_positions=7))
    rows = [[5, 9, 12, 7, 20, 3, 11], [8, 14, 2, 30]]
    width = 7
    ids = torch.zeros((2, width), dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    with ScalingHandle(model, iv, 1.0), torch.no_grad():
        batch = answer_logits(model, ids, mask)
        alone = [answer_logits(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
                 for r in rows]
        with pytest.raises(PromptTooLongError, match="dynscalar"):
            model(input_ids=torch.ones((1, 8), dtype=torch.long))
    torch.testing.assert_close(batch, torch.cat(alone), rtol=1e-4, atol=1e-4)


def test_dynscalar_generation_with_kv_cache_equals_full_recompute():
    model = make_model("llama")
    iv = _random_params(_intervention(model, "dynscalar", ("mlp",)), scale=0.2)
    with ScalingHandle(model, iv, 1.0):
        out = model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=5,
                             do_sample=False, return_dict_in_generate=True, output_logits=True,
                             pad_token_id=0)
        full = _logits(model, out.sequences)
    step = torch.stack(out.logits, 1).float()
    torch.testing.assert_close(step, full[:, IDS.shape[1] - 1:-1], rtol=1e-4, atol=1e-4)


# ---- the objective by hand -------------------------------------------------------------------
def test_hinge_matches_hand_computation():
    logits = torch.tensor([[1.0, 3.0, 0.5], [2.0, -1.0, 0.0]])
    correct, wrong = torch.tensor([1, 0]), torch.tensor([0, 1])
    # z_w - z_c: row 0: 1 - 3 = -2; row 1: -1 - 2 = -3
    got = effectiveness_term(logits, correct, wrong, torch.tensor([1.0, 1.0]), margin=1.0)
    torch.testing.assert_close(got, torch.tensor([3.0, 4.0]))
    got = effectiveness_term(logits, correct, wrong, torch.tensor([-1.0, -1.0]), margin=2.5)
    torch.testing.assert_close(got, torch.tensor([0.5, 0.0]))  # max(0, 2.5 - 2), max(0, 2.5 - 3)


def test_kl_matches_hand_computation():
    p_logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    q_logits = torch.tensor([[1.0, 0.0, 2.0, -1.0]])
    correct, wrong = torch.tensor([2]), torch.tensor([0])
    p = [math.exp(x) for x in (1.0, 0.5)]
    q = [math.exp(x) for x in (0.0, -1.0)]
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    want = sum(a * math.log(a / b) for a, b in zip(p, q))
    got = faithfulness_term(p_logits, q_logits, correct, wrong, "renormalized")
    assert got.item() == pytest.approx(want, rel=1e-5)
    P, Q = p_logits.softmax(-1)[0], q_logits.softmax(-1)[0]
    masked = sum(float(P[k] * (P[k] / Q[k]).log()) for k in (1, 3))
    assert faithfulness_term(p_logits, q_logits, correct, wrong, "masked").item() == pytest.approx(
        masked, rel=1e-5)
    full = float((P * (P / Q).log()).sum())
    assert faithfulness_term(p_logits, q_logits, correct, wrong, "full").item() == pytest.approx(
        full, rel=1e-5)
    # identical distributions on the other tokens: 0 whatever the answer tokens do
    moved = p_logits.clone()
    moved[0, 2] += 5.0
    moved[0, 0] -= 3.0
    assert faithfulness_term(p_logits, moved, correct, wrong).item() == pytest.approx(0, abs=1e-6)


def test_l1_and_total_objective_match_hand_computation():
    model = make_model("llama")
    iv = make_intervention("activscalar", scaling_sites(model, ("mlp",)), 32, n_positions=2)
    with torch.no_grad():
        iv.alpha.copy_(torch.tensor([[0.5, -1.0], [0.0, 2.0], [-0.25, 0.0]]))
    assert iv.l1().item() == pytest.approx(3.75)
    assert iv.n_parameters() == 6 and iv.n_nonzero() == 4 and iv.n_nonzero(0.6) == 2
    sv = make_intervention("steervec", scaling_sites(model, ("mlp",)), 32, n_positions=2)
    assert sv.n_parameters() == 3 * 2 * 32
    dyn = make_intervention("dynscalar", scaling_sites(model, ("mlp",)), 32)
    assert dyn.n_parameters() == 3 * 32 + 3

    clean = torch.tensor([[0.0, 1.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    logits = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.0, 1.0, 0.0, 0.0]])
    correct, wrong, beta = torch.tensor([2, 1]), torch.tensor([0, 3]), torch.tensor([1.0, -1.0])
    terms = scaling_objective(clean, logits, correct, wrong, beta, iv.l1(), margin=1.0,
                              lambda_f=0.5, lambda_m=0.1)
    eff = (max(0, 1 - (1 - 2)) + max(0, 1 + (0 - 1))) / 2  # (2 + 0) / 2
    kl = faithfulness_term(clean, logits, correct, wrong).mean().item()
    assert terms.effectiveness.item() == pytest.approx(eff)
    assert terms.total.item() == pytest.approx(eff + 0.5 * kl + 0.1 * 3.75, rel=1e-6)


# ---- a model whose decision is planted in one component ---------------------------------------
ANSWERS = ("apple", "pear")


def planted_model(tok):
    """2-layer Llama whose correct-vs-wrong logit difference is written by layer 1's MLP alone.

    Every embedding carries a constant direction e₀ (and nothing along e₁); layer 1's MLP reads
    e₀ and writes a positive amount along e₁ (silu(x)·x ≥ 0); the unembedding of the correct token
    is +2·e₁ and of the wrong one −2·e₁. Attention and layer 0's MLP are kept small, so scaling
    any other activation barely moves the answer: only α(mlp.1, last position) < −1 flips it.
    """
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, vocab_size=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    layers = model.model.layers
    c, w = (tok.convert_tokens_to_ids(a) for a in ANSWERS)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] += 1.0
        emb[:, 1] = 0.0
        for layer in layers:
            layer.self_attn.o_proj.weight.mul_(0.2)
        layers[0].mlp.down_proj.weight.mul_(0.2)
        mlp = layers[1].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight.zero_()
            proj.weight[:, 0] = 1.0
        mlp.down_proj.weight.zero_()
        mlp.down_proj.weight[1] = 1.0 / 512
        head = model.lm_head.weight
        head[c].zero_()
        head[w].zero_()
        head[c, 1], head[w, 1] = 2.0, -2.0
    return model


def planted_prompts(n, length, seed):
    rng = random.Random(seed)
    words = [x for x in VOCAB_WORDS if x not in ANSWERS]
    return [TaskExample(" ".join(rng.choice(words) for _ in range(length)), *ANSWERS)
            for _ in range(n)]


@pytest.fixture(scope="module")
def planted():
    tok = make_tokenizer()
    return planted_model(tok), tok


def test_learned_scalars_concentrate_on_the_planted_component(planted):
    model, tok = planted
    train = planted_prompts(32, 6, seed=0)
    recipe = fit_scaling(model, tok, train, ScaleOptions(method="activscalar", steps=60, lr=5e-2,
                                                         lambda_m=1e-2, progress=False))
    alpha = recipe.intervention.alpha.detach()  # sites attn.0, attn.1, mlp.0, mlp.1
    names = [s.name for s in recipe.sites]
    site, pos = divmod(int(alpha.abs().argmax()), alpha.shape[1])
    assert (names[site], pos) == ("mlp.1", alpha.shape[1] - 1)
    assert alpha[site, pos] < -1.0  # reverses the planted contribution
    assert alpha[site, pos].abs() / alpha.abs().sum() > 0.9
    report = evaluate_scaling(model, tok, recipe, planted_prompts(32, 6, seed=5))
    assert report["clean_accuracy"] == 1.0
    assert report["per_beta"]["+1"]["flip_accuracy"] == 1.0
    assert report["per_beta"]["-1"]["flip_accuracy"] == 1.0
    assert report["n_nonzero"] <= 2


@pytest.mark.parametrize("bias", [True, False])
def test_dynscalar_trained_on_one_length_applies_to_another(planted, bias):
    model, tok = planted
    recipe = fit_scaling(model, tok, planted_prompts(32, 6, seed=0),
                         ScaleOptions(method="dynscalar", steps=60, lr=3e-2, lambda_m=1e-2, bias=bias,
                                      progress=False))
    for length in (3, 12):
        report = evaluate_scaling(model, tok, recipe, planted_prompts(32, length, seed=7))
        assert report["prompt_tokens"] == [length]
        assert report["per_beta"]["+1"]["flip_accuracy"] == 1.0
        assert report["per_beta"]["-1"]["flip_accuracy"] == 1.0
    weight = recipe.intervention.weight.detach().abs().sum(1)
    assert int(weight.argmax()) == [s.name for s in recipe.sites].index("mlp.1")
    if not bias:
        return
    # a positional intervention refuses the longer prompts instead of guessing
    positional = fit_scaling(model, tok, planted_prompts(8, 6, seed=0), method="activscalar",
                             steps=2, progress=False)
    with pytest.raises(ValueError, match="positions"):
        evaluate_scaling(model, tok, positional, planted_prompts(4, 10, seed=7))


# ---- training: determinism, families, recipes -------------------------------------------------
EXAMPLES = [
    TaskExample("the dog runs in the rain and", "cat", "bird"),
    TaskExample("a car is fast on the road and", "bus", "train"),
    TaskExample("the sun is warm and the sky", "red", "green"),
    TaskExample("music and song of the band", "big", "small"),
]


def test_training_is_deterministic_under_a_seed():
    tok = make_tokenizer()
    model = make_model("gpt2")
    opts = ScaleOptions(method="steervec", steps=12, batch_size=2, progress=False, seed=3)
    a = fit_scaling(model, tok, EXAMPLES, opts).intervention.vectors.detach()
    b = fit_scaling(model, tok, EXAMPLES, opts).intervention.vectors.detach()
    assert torch.equal(a, b) and a.abs().sum() > 0
    assert all(p.requires_grad for p in model.parameters())  # model flags restored


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_fit_flips_training_prompts_on_several_families(family):
    tok = make_tokenizer()
    model = make_model(family)
    recipe = fit_scaling(model, tok, EXAMPLES, method="activscalar", steps=60, lr=0.1,
                         sites=("attn", "mlp", "residual"), lambda_m=1e-4, progress=False)
    report = evaluate_scaling(model, tok, recipe, EXAMPLES)
    assert report["per_beta"]["+1"]["flip_accuracy"] == 1.0
    assert report["per_beta"]["-1"]["flip_accuracy"] == 1.0


def test_recipe_round_trip_and_model_checks(tmp_path):
    tok = make_tokenizer()
    model = make_model("qwen2")
    for method in METHODS:
        recipe = fit_scaling(model, tok, EXAMPLES, method=method, steps=5, progress=False)
        path = recipe.save_pretrained(tmp_path / method)
        loaded = ScaleRecipe.from_pretrained(path)
        assert loaded.method == method and loaded.sites == recipe.sites
        for k, v in recipe.intervention.state_dict().items():
            assert torch.equal(v, loaded.intervention.state_dict()[k])
        with recipe.apply(model, 1.0):
            a = _logits(model)
        with loaded.apply(model, 1.0):
            assert torch.equal(_logits(model), a)
    with pytest.raises(RecipeMismatchError, match="model type 'llama'"):
        loaded.apply(make_model("llama"))
    with pytest.raises(ValueError, match="not a steerwise recipe"):
        Recipe.from_pretrained(tmp_path / "dynscalar")
    with pytest.raises(ValueError, match="not a scaling recipe"):
        from conftest import random_recipe

        random_recipe(model).save_pretrained(tmp_path / "caa")
        ScaleRecipe.from_pretrained(tmp_path / "caa")


def test_bad_options_and_inputs_give_clear_errors():
    tok = make_tokenizer()
    model = make_model("llama")
    with pytest.raises(ValueError, match="unknown method"):
        fit_scaling(model, tok, EXAMPLES, method="nope")
    with pytest.raises(ValueError, match="unknown site"):
        fit_scaling(model, tok, EXAMPLES, sites=("heads",))
    with pytest.raises(ValueError, match="not a single token|unknown to the tokenizer"):
        fit_scaling(model, tok, [TaskExample("the dog", "zebra", "cat")], steps=1)
    with pytest.raises(ValueError, match="no task examples"):
        encode_examples(tok, [])


def test_faithfulness_term_drives_training_when_the_hinge_is_off():
    """With margin −100 the hinge is 0, so a few small Adam steps only descend the KL term."""
    tok = make_tokenizer()
    model = make_model("llama")
    start = fit_scaling(model, tok, EXAMPLES, method="steervec", steps=0, progress=False)
    _random_params(start.intervention, scale=0.5)
    kl0 = evaluate_scaling(model, tok, start, EXAMPLES)["per_beta"]["+1"]["kl"]
    trained = fit_scaling(model, tok, EXAMPLES, method="steervec", steps=5, margin=-100.0,
                          lambda_m=0.0, lr=1e-2, init=start.intervention, progress=False)
    log = trained.info["training"]["log"]
    assert log["effectiveness"] == [0.0, 0.0]
    kl1 = evaluate_scaling(model, tok, trained, EXAMPLES)["per_beta"]["+1"]["kl"]
    assert kl0 > 1e-3 and kl1 < 0.9 * kl0


def test_minimality_term_sparsifies():
    tok = make_tokenizer()
    model = make_model("llama")
    dense = fit_scaling(model, tok, EXAMPLES, method="activscalar", steps=50, lambda_m=0.0,
                        lr=5e-2, progress=False)
    sparse = fit_scaling(model, tok, EXAMPLES, method="activscalar", steps=50, lambda_m=0.05,
                         lr=5e-2, progress=False)
    assert sparse.intervention.l1() < 0.5 * dense.intervention.l1()
    assert sparse.intervention.n_nonzero(0.05) < dense.intervention.n_nonzero(0.05)


def test_answer_logits_matches_full_forward():
    model = make_model("gpt2")
    with torch.no_grad():
        got = answer_logits(model, IDS, torch.ones_like(IDS))
    torch.testing.assert_close(got, _logits(model)[:, -1])
    assert F.softmax(got, -1).shape == (1, 64)
