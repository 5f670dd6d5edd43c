"""Evaluation: toxicity scorers, generation protocol, perplexity, MMLU, Pareto fronts, sweeps."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB_WORDS, make_model, make_tokenizer, random_recipe

from steerwise.eval.generation import (
    GenerationConfig,
    evaluate_toxicity,
    load_prompts,
    sample_continuations,
    truncate_left,
)
from steerwise.eval.mmlu import (
    MMLUQuestion,
    build_prompt,
    evaluate_mmlu,
    load_mmlu,
    model_choice_scorer,
    read_mmlu_csv,
)
from steerwise.eval.pareto import (
    best_within,
    front_gap,
    interpolate_front,
    is_dominated,
    pareto_front,
)
from steerwise.eval.perplexity import (
    conditional_perplexity,
    continuation_logprobs,
    corpus_perplexity,
    next_token_logprobs,
)
from steerwise.eval.sweep import (
    SweepConfig,
    SweepData,
    aggregate,
    compare_gates,
    fronts,
    read_points,
    run_sweep,
    write_tables,
)
from steerwise.eval.toxicity import TransformersClassifierScorer, load_scorer, summarize

SHARED = Path(__file__).resolve().parents[2] / "shared"
TESTBED = SHARED / "testbed" / "tox-qwen2-7m"


# ---- toxicity ----------------------------------------------------------------------------------
def test_profanity_scorer_separates_toxic_from_neutral():
    pytest.importorskip("profanity_check", reason="the eval extra (alt-profanity-check) is absent")
    scorer = load_scorer("profanity-check")
    toxic = ["you are a fucking idiot", "shut up you stupid bitch", "fuck this shit, asshole"]
    neutral = ["The weather is lovely today.", "She planted tomatoes in the garden.",
               "The train leaves at nine in the morning."]
    s_tox, s_neu = scorer.score(toxic), scorer.score(neutral)
    assert s_tox.shape == (3,) and s_neu.shape == (3,)
    assert (s_tox >= 0.8).all(), s_tox
    assert (s_neu <= 0.2).all(), s_neu
    summary = summarize(np.concatenate([s_tox, s_neu]))
    assert summary.rate == pytest.approx(0.5) and summary.n == 6


def test_summarize_rate_and_mean_and_errors():
    s = summarize([0.1, 0.5, 0.49, 0.9])
    assert s.rate == 0.5 and s.mean == pytest.approx(0.4975)
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([0.2, float("nan")])
    with pytest.raises(ValueError, match="unknown toxicity scorer"):
        load_scorer("perspective")


def test_transformers_classifier_scorer(tmp_path, tokenizer):
    """Any local sequence classifier works; the toxic label is found by name or given."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, n_positions=64,
                               vocab_size=64, num_labels=2, pad_token_id=0,
                               id2label={0: "neutral", 1: "toxic"}, label2id={"neutral": 0, "toxic": 1})
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    scorer = load_scorer(f"hf:{tmp_path}", device="cpu")
    assert isinstance(scorer, TransformersClassifierScorer) and scorer.label_index == 1
    s = scorer.score(["the dog runs", "bad bad cat", "hello world the sun"])
    assert s.shape == (3,) and ((s >= 0) & (s <= 1)).all()
    other = load_scorer(f"hf:{tmp_path}@neutral", device="cpu").score(["the dog runs"])
    assert other[0] == pytest.approx(1 - s[0], abs=1e-5)
    with pytest.raises(ValueError, match="no label 'insult'"):
        load_scorer(f"hf:{tmp_path}@insult", device="cpu")


# ---- generation --------------------------------------------------------------------------------
def test_load_prompts_jsonl_txt_and_rows(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text("\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(6))
                 + "\n" + json.dumps({"prompt": {"text": "nested"}}) + "\n")
    assert load_prompts(j) == ["p0", "p1", "p2", "p3", "p4", "p5", "nested"]
    assert load_prompts(j, rows=slice(1, None, 2), limit=2) == ["p1", "p3"]
    t = tmp_path / "p.txt"
    t.write_text("one\n\ntwo\n")
    assert load_prompts(t) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: no string field 'prompt'"):
        load_prompts(bad)


def test_truncate_left_keeps_the_end(tokenizer):
    text = "the dog runs to the car and the cat sleeps"
    out = truncate_left(tokenizer, [text, "the sun"], 3)
    assert out[0] == "the cat sleeps" and out[1] == "the sun"


def test_sampling_is_seeded_and_steering_changes_it(tokenizer):
    model = make_model("qwen2")
    recipe = random_recipe(model, gated=False, scale=30.0)
    prompts = ["the dog runs", "a cat sleeps on the", "rain"]
    cfg = GenerationConfig(max_new_tokens=8, batch_size=2)
    a = sample_continuations(model, tokenizer, prompts, config=cfg, seed=3)
    b = sample_continuations(model, tokenizer, prompts, config=cfg, seed=3)
    assert a == b and len(a) == 3
    steered = sample_continuations(model, tokenizer, prompts, recipe, 1.0, cfg, seed=3)
    assert steered != a
    assert sample_continuations(model, tokenizer, prompts, recipe, 0.0, cfg, seed=3) == a

    class KeywordScorer:
        name = "kw"

        def score(self, texts):
            return np.array([1.0 if "bad" in t else 0.0 for t in texts])

    res = evaluate_toxicity(model, tokenizer, prompts, KeywordScorer(), config=cfg, seeds=[0, 1])
    assert res.n == 6 and len(res.per_seed_rate) == 2 and 0 <= res.rate <= 1


# ---- perplexity --------------------------------------------------------------------------------
def _trained_tiny_lm(tokenizer):
    """A tiny qwen2 trained for a moment on repetitive text: it has something to predict."""
    model = make_model("qwen2", seed=0)
    text = " ".join(VOCAB_WORDS[i % 20] for i in range(100))
    ids = torch.tensor(tokenizer(text)["input_ids"][:48])[None]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_perplexity_own_greedy_text_lower_than_shuffled(tokenizer):
    model = _trained_tiny_lm(tokenizer)
    ids = torch.tensor([tokenizer("the a an")["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0)
    greedy_ids = out[0].tolist()
    rng = np.random.default_rng(0)
    shuffled_ids = [greedy_ids[i] for i in rng.permutation(len(greedy_ids))]
    greedy = tokenizer.decode(greedy_ids)
    shuffled = tokenizer.decode(shuffled_ids)
    p_greedy = corpus_perplexity(model, tokenizer, greedy, window=64)
    p_shuf = corpus_perplexity(model, tokenizer, shuffled, window=64)
    assert p_greedy.n_tokens == p_shuf.n_tokens
    assert p_greedy.perplexity < 0.5 * p_shuf.perplexity


def test_perplexity_matches_model_loss_and_steering_changes_it(tokenizer):
    model = make_model("llama")
    text = "the dog runs to the car and the cat sleeps in the sun"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    p = corpus_perplexity(model, tokenizer, text, window=64)
    assert p.nll == pytest.approx(loss, rel=1e-4) and p.perplexity == pytest.approx(math.exp(loss))
    # windows: each window is scored on its own
    w = corpus_perplexity(model, tokenizer, text, window=4)
    assert w.n_tokens == ids.shape[1] - math.ceil(ids.shape[1] / 4)
    recipe = random_recipe(model, gated=False, scale=20.0)
    assert corpus_perplexity(model, tokenizer, text, recipe, 1.0).perplexity != pytest.approx(
        p.perplexity)
    assert corpus_perplexity(model, tokenizer, text, recipe, 0.0).perplexity == p.perplexity


def test_continuation_logprobs_padding_invariant(tokenizer):
    model = make_model("gpt_neox")
    ctx = ["the dog", "a big red car runs on the", ""]
    cont = [" runs", " road fast", "hello world"]
    sums, counts = continuation_logprobs(model, tokenizer, ctx, cont, batch_size=3)
    assert counts.tolist() == [1, 2, 1]
    for i in range(3):
        s1, _ = continuation_logprobs(model, tokenizer, [ctx[i]], [cont[i]], batch_size=1)
        assert sums[i] == pytest.approx(s1[0], abs=1e-4)
    seen: list[dict] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    lp = next_token_logprobs(model, tokenizer, ["the dog", "a big red car runs on the"])
    hook.remove()
    assert [kw.get("logits_to_keep") for kw in seen] == [1]  # the LM head on the last position
    first = tokenizer(" runs", add_special_tokens=False)["input_ids"][0]
    assert lp[0, first] == pytest.approx(sums[0], abs=1e-4)
    cp = conditional_perplexity(model, tokenizer, ctx[:2], cont[:2])
    assert cp.n_tokens == 3 and cp.perplexity == pytest.approx(math.exp(-sums[:2].sum() / 3))
    with pytest.raises(ValueError, match="2 contexts but 1"):
        continuation_logprobs(model, tokenizer, ctx[:2], cont[:1])


# ---- MMLU --------------------------------------------------------------------------------------
def _write_mmlu(root: Path) -> None:
    rows = {
        "test": [("What is red?", "apple", "sky", "snow", "grass", 0),
                 ("Which, of these, runs?", "rock", "dog", "tree", "road", "1"),
                 ('Quote "this" one', "a", "b", "c, d", "e", 3)],
        "dev": [(f"dev q{i}", "w", "x", "y", "z", i % 4) for i in range(5)],
    }
    for split, rs in rows.items():
        (root / split).mkdir(parents=True)
        for subject in ("alpha_beta", "gamma"):
            with (root / split / f"{subject}_{split}.csv").open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
                w.writerows(rs)


def test_mmlu_reader_and_exact_accuracy_of_a_stub(tmp_path):
    _write_mmlu(tmp_path)
    qs = load_mmlu(tmp_path, "test")
    assert list(qs) == ["alpha_beta", "gamma"]
    q = qs["alpha_beta"]
    assert q[1] == MMLUQuestion("alpha_beta", "Which, of these, runs?", ("rock", "dog", "tree", "road"), 1)
    assert q[2].choices[2] == "c, d" and q[2].answer == 3
    shots = load_mmlu(tmp_path, "dev")
    prompt = build_prompt(q[0], shots["alpha_beta"][:5])
    assert prompt.startswith("The following are multiple choice questions (with answers) about "
                             "alpha beta.\n\n")
    assert prompt.count("Answer:") == 6 and prompt.endswith("D. grass\nAnswer:")

    # a stub that prefers choice 0 for questions containing "red" and choice 3 otherwise:
    # right on "What is red?" and the quote question, wrong on "runs" -> 2/3 per subject
    def stub(contexts, continuations):
        out = []
        for c, x in zip(contexts, continuations):
            last_q = c.rsplit("\n\n", 1)[-1]
            want = " A" if "red" in last_q else " D"
            out.append(0.0 if x == want else -1.0)
        return np.array(out)

    res = evaluate_mmlu(qs, stub, shots=shots, k=5)
    assert res.n == 6 and res.accuracy == pytest.approx(4 / 6)
    assert res.per_subject == {"alpha_beta": pytest.approx(2 / 3), "gamma": pytest.approx(2 / 3)}
    # text scoring sees choice texts; length normalisation divides by the given counts
    res_text = evaluate_mmlu(qs, lambda c, x: np.array([-len(t) for t in x], dtype=float), k=0,
                             scoring="cloze")
    # shortest choice wins: "apple"? no: all -> picks shortest text
    expect = [int(np.argmin([len(" " + c) for c in qq.choices])) == qq.answer
              for v in qs.values() for qq in v]
    assert res_text.accuracy == pytest.approx(np.mean(expect))
    with pytest.raises(ValueError, match="shape"):
        evaluate_mmlu(qs, lambda c, x: np.zeros(3), k=0)


def test_mmlu_reader_errors(tmp_path):
    bad = tmp_path / "x_test.csv"
    bad.write_text("q,a,b\n1,2,3\n")
    with pytest.raises(ValueError, match="expected header"):
        read_mmlu_csv(bad)
    bad.write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,7\n")
    with pytest.raises(ValueError, match="x_test.csv:2: answer '7'"):
        read_mmlu_csv(bad)
    with pytest.raises(FileNotFoundError):
        load_mmlu(tmp_path / "nope")


def test_model_choice_scorer_letter_shortcut_equals_full_scoring(tmp_path, tokenizer):
    model = make_model("qwen2")
    ctx = ["the dog runs", "the dog runs", "a cat", "a cat"]
    cont = [" big", " small", " big", " small"]
    fast = model_choice_scorer(model, tokenizer)(ctx, cont)
    full, _ = continuation_logprobs(model, tokenizer, ctx, cont)
    np.testing.assert_allclose(fast, full, atol=1e-4)


# ---- Pareto ------------------------------------------------------------------------------------
def test_pareto_front_on_hand_made_points():
    # (toxicity, perplexity), both minimised
    pts = [(0.40, 10.0),   # 0 front (lowest ppl)
           (0.30, 12.0),   # 1 front
           (0.35, 13.0),   # 2 dominated by 1
           (0.10, 20.0),   # 3 front
           (0.10, 25.0),   # 4 dominated by 3 (same tox, worse ppl)
           (0.05, 40.0),   # 5 front
           (0.30, 12.0),   # 6 duplicate of 1: kept
           (float("nan"), 1.0),  # 7 dropped
           (0.50, 11.0)]   # 8 dominated by 0
    x = [p[0] for p in pts]
    y = [p[1] for p in pts]
    assert pareto_front(x, y) == [5, 3, 1, 6, 0]
    # MMLU maximised: (toxicity, accuracy)
    acc = [0.60, 0.55, 0.58, 0.40, 0.45, 0.30, 0.55, 0.9, 0.61]
    assert pareto_front(x, acc, minimize_y=False) == [5, 4, 1, 6, 2, 0, 8]
    assert is_dominated((0.35, 13.0), (0.30, 12.0))
    assert not is_dominated((0.30, 12.0), (0.30, 12.0))
    assert best_within(x, y, 12.0, higher_is_better=False) == 0.30
    assert math.isnan(best_within(x, y, 5.0, higher_is_better=False))
    # interpolation along the front: between (0.30, 12) and (0.10, 20) at ppl 16 -> 0.20
    assert interpolate_front(x, y, 16.0, higher_is_better=False) == pytest.approx(0.20)
    assert interpolate_front(x, y, 12.0, higher_is_better=False) == pytest.approx(0.30)
    assert math.isnan(interpolate_front(x, y, 50.0, higher_is_better=False))
    gap = front_gap((x, y), ([0.2, 0.01], [12.0, 30.0]), [12.0, 30.0], higher_is_better=False)
    np.testing.assert_allclose(gap, [0.2 - 0.30, 0.01 - 0.10])


# ---- sweep -------------------------------------------------------------------------------------
def _sweep_data() -> SweepData:
    return SweepData(toxic_prompts=["the dog", "a cat"], source_pool=[f"s{i}" for i in range(8)],
                     target_pool=[f"t{i}" for i in range(8)], control_pool=[f"c{i}" for i in range(8)])


class _Counter:
    def __init__(self):
        self.fits, self.evals = [], []

    def fit(self, model, tok, source, control, target, opts, progress=False):
        self.fits.append((opts.method, opts.gate, tuple(source)))
        return random_recipe(model, gated=opts.gate != "none")

    def eval(self, model, tok, data, scorer, config, recipe, strength, seed):
        self.evals.append((recipe is None, strength, seed))
        gated = recipe is not None and recipe.gate != "none"
        return {"toxicity": max(0.0, 0.4 - strength * (0.1 if gated else 0.12)),
                "ppl": 10 + strength * (1 if gated else 3), "mmlu": 0.5 - 0.01 * strength}


def test_sweep_resumes_without_recomputing(tmp_path, tokenizer):
    model = make_model("qwen2")
    cfg = SweepConfig(methods=["caa"], gates=["none", "dsas"], strengths={"caa": [0, 1, 2]},
                      seeds=[0, 1], n_fit=4)
    c1 = _Counter()
    kw = {"scorer": None, "progress": False, "log": lambda s: None}
    # a sweep killed after 3 points: emulate by running a sub-grid first
    partial = SweepConfig(**{**cfg.__dict__, "strengths": {"caa": [0, 1]}, "seeds": [0]})
    run_sweep(model, tokenizer, _sweep_data(), partial, tmp_path, fit_fn=c1.fit, eval_fn=c1.eval, **kw)
    assert len(read_points(tmp_path)) == 3  # base + caa/none λ=1 + caa/dsas λ=1
    # a truncated last line (killed mid-write) is ignored
    with (tmp_path / "points.jsonl").open("a") as fh:
        fh.write('{"method": "caa", "gate"')
    c2 = _Counter()
    with pytest.warns(UserWarning, match="truncated"):
        points = run_sweep(model, tokenizer, _sweep_data(), cfg, tmp_path, fit_fn=c2.fit,
                           eval_fn=c2.eval, **kw)
    # seed 0: only λ=2 for both gates is new; seed 1: base + 4 points
    assert len(c2.evals) == 2 + 5
    assert sorted((s, sd) for _, s, sd in c2.evals).count((1.0, 0)) == 0
    # fitted recipes of seed 0 were reloaded from disk, not refitted
    assert {(m, g) for m, g, _ in c2.fits} == {("caa", "none"), ("caa", "dsas")}
    assert len(c2.fits) == 2
    assert len(points) == 10
    c3 = _Counter()
    run_sweep(model, tokenizer, _sweep_data(), cfg, tmp_path, fit_fn=c3.fit, eval_fn=c3.eval, **kw)
    assert c3.evals == [] and c3.fits == []
    # other settings in the same directory are refused
    with pytest.raises(ValueError, match="other settings.*n_fit"):
        run_sweep(model, tokenizer, _sweep_data(), SweepConfig(**{**cfg.__dict__, "n_fit": 5}),
                  tmp_path, fit_fn=c3.fit, eval_fn=c3.eval, **kw)
    # fit sets differ between seeds
    assert c1.fits[0][2] != c2.fits[0][2]

    rows = aggregate(points)
    assert {(r["method"], r["gate"], r["strength"]) for r in rows} == {
        ("caa", g, s) for g in ("none", "dsas") for s in (0.0, 1.0, 2.0)}
    assert all(r["n_seeds"] == 2 for r in rows)
    f = fronts(rows, "ppl")
    assert set(f) == {"caa+none", "caa+dsas"}
    comp = compare_gates(rows, ppl_factors=(1.25,), mmlu_drops=())
    assert comp[0]["toxicity_with"] == pytest.approx(0.2)  # λ=2, ppl 12 ≤ 12.5
    assert comp[0]["toxicity_without"] == pytest.approx(0.4)  # only λ=0 fits the budget
    # the no-gate front at ppl 12.5: between (0.4, 10) and (0.28, 13) -> 0.3
    assert comp[0]["toxicity_without_at"] == pytest.approx(0.30)
    assert math.isnan(comp[0]["toxicity_with_at"])  # the DSAS front ends at ppl 12
    files = write_tables(points, tmp_path)
    assert files["summary"].read_text().count("\n") == 7

    from steerwise.eval.plots import plot_fronts

    png = plot_fronts(rows, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_sweep_cli_grids_and_errors():
    from steerwise.eval.cli import parse_grids

    g = parse_grids(["caa=1,2", "0.5"], ["caa", "iti"])
    assert g == {"caa": [0.0, 0.5], "iti": [0.0, 0.5]}
    assert parse_grids(["caa=3,1"], ["caa"])["caa"] == [0.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="not swept"):
        parse_grids(["foo=1"], ["caa"])


@pytest.mark.skipif(not TESTBED.is_dir(), reason="the shared testbed model is absent")
def test_testbed_preset_uses_held_out_rows():
    from steerwise.eval.data import testbed_data, wikitext_articles

    d = testbed_data(SHARED / "data", n_toxic=5, n_benign=3, mmlu_subjects=2, mmlu_per_subject=2)
    rows = [json.loads(x) for x in (SHARED / "data" / "rtp_toxic.jsonl").read_text().splitlines()]
    assert d.toxic_prompts == [r["prompt"] for r in rows[1:11:2]]
    assert len(d.benign_prompts) == 3 and len(d.ppl_continuations) == 200
    arts = wikitext_articles(SHARED / "data" / "wikitext2_test.txt")
    assert d.ppl_texts[0] == arts[0] and d.ppl_texts[1] == arts[10]
    assert d.ppl_texts[0].startswith("= Robert Boulter =")
    assert not set(d.source_pool) & set(d.target_pool)
    assert sum(len(v) for v in d.mmlu_questions.values()) == 4
    # every control pool is disjoint from every evaluation set; the default is the WikiText one
    from steerwise.eval.data import word_chunks

    assert d.control_pool is d.control_pools["wikitext"]
    held_pieces = {c for a in d.ppl_texts for c in word_chunks(a)}
    evaluation = set(d.toxic_prompts) | set(d.benign_prompts) | set(d.ppl_prompts)
    for name, pool in d.control_pools.items():
        assert len(pool) >= 1000, name
        assert not set(pool) & held_pieces, name
        assert not any(t.startswith(p) for t in pool for p in evaluation), name
    mix = d.control_pools["mix"]
    assert set(mix[0::2]) <= set(d.control_pools["rtp-nontoxic"])
    assert set(mix[1::2]) <= set(d.control_pools["wikitext"])


@pytest.mark.skipif(not TESTBED.is_dir(), reason="the shared testbed model is absent")
def test_sweep_command_end_to_end(tmp_path):
    """`steerwise sweep` on the testbed LM and tiny files: every output appears; a re-run
    resumes with nothing to compute."""
    pytest.importorskip("profanity_check", reason="the eval extra (alt-profanity-check) is absent")
    from steerwise.cli import main

    model_dir = TESTBED
    words = VOCAB_WORDS
    (tmp_path / "src.txt").write_text("\n".join(f"bad {words[i]} bad {words[i + 1]}" for i in range(8)))
    (tmp_path / "tgt.txt").write_text("\n".join(f"good {words[i]} sweet" for i in range(8)))
    (tmp_path / "ctl.txt").write_text("\n".join(f"the {words[i + 10]} runs" for i in range(8)))
    (tmp_path / "tox.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in
                                                  ["the bad dog", "a cat sleeps"]))
    (tmp_path / "wiki.txt").write_text(" ".join(words * 3))
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", str(model_dir), "--device", "cpu", "--out", str(out),
            "--methods", "caa", "--grid", "2", "--seeds", "0", "--n-fit", "6", "--layers", "2",
            "--toxic-prompts", str(tmp_path / "tox.jsonl"), "--benign-prompts",
            str(tmp_path / "tox.jsonl"), "--source", str(tmp_path / "src.txt"),
            "--target", str(tmp_path / "tgt.txt"), "--control", str(tmp_path / "ctl.txt"),
            "--ppl-text", str(tmp_path / "wiki.txt"), "--max-new-tokens", "5",
            "--ppl-window", "32", "--no-progress"]
    assert main(argv) == 0
    for name in ("points.jsonl", "points.csv", "summary.csv", "summary.json", "summary.md",
                 "pareto.png", "sweep.json", "data.json"):
        assert (out / name).is_file(), name
    points = read_points(out)
    assert {(p["method"], p["gate"], p["strength"]) for p in points} == {
        ("base", "none", 0.0), ("caa", "none", 2.0), ("caa", "dsas", 2.0)}
    assert main(argv) == 0
    assert len(read_points(out)) == 3


def _bos_tokenizer():
    """The test tokenizer, made to start every text with a BOS token as Gemma's and Llama's do."""
    from tokenizers import processors

    tok = make_tokenizer()
    tok.add_special_tokens({"bos_token": "<unk>"})  # id 2 serves as BOS here
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<unk> $A", special_tokens=[("<unk>", 2)])
    return tok


def test_scoring_puts_the_bos_back_in_front():
    """Perplexity and log-likelihoods tokenize pieces without special tokens; with a tokenizer
    that starts texts with BOS, the rows scored must start with it (Gemma without <bos> scores
    RTP text at ppl ≈ 670 instead of ≈ 40) and every continuation token is scored."""
    from steerwise.activations import bos_prefix
    from steerwise.eval import perplexity as P

    plain, bos = make_tokenizer(), _bos_tokenizer()
    assert bos_prefix(plain) == [] and bos_prefix(bos) == [2]
    assert bos("fruit apple")["input_ids"][0] == 2
    seen: list[list[int]] = []

    def spy(model, rows, n_target, pad_id, batch_size, progress, desc):
        seen.extend(rows)
        return np.zeros(len(rows)), np.asarray(n_target)

    model = make_model("qwen2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "_score_rows", spy)
        _, counts = P.continuation_logprobs(model, bos, ["fruit", ""], [" apple pear", " pear"])
        assert [r[0] for r in seen] == [2, 2] and counts.tolist() == [2, 1]
        seen.clear()
        _, counts = P.continuation_logprobs(model, plain, ["fruit", ""], [" apple pear", " pear"])
        assert [r[0] for r in seen] != [2, 2] and counts.tolist() == [2, 0]
        seen.clear()
        P.corpus_perplexity(model, bos, "apple pear fruit " * 10, window=8)
        assert all(r[0] == 2 and len(r) <= 8 for r in seen)
        assert sum(len(r) - 1 for r in seen) == 30  # every text token scored once


def test_sweep_fits_keep_lambda_one_unless_a_variant_asks_for_auto():
    """The grid gives λ: a sweep's fits store λ = 1 and hold no text out (fit's own default,
    "auto", would hold out a quarter of the target and control texts); a variant may ask."""
    from steerwise.eval.cli import parse_gate_variant
    from steerwise.eval.sweep.spec import SweepConfig, build_fit_options

    name, variant = parse_gate_variant("auto=dsas,default_strength=auto,first_token=skip")
    cfg = SweepConfig(methods=["caa"], gates=["dsas", name], gate_variants={name: variant})
    plain, asked = build_fit_options("caa", "dsas", cfg), build_fit_options("caa", name, cfg)
    assert (plain.default_strength, plain.first_token) == (1.0, "steer")
    assert (asked.default_strength, asked.first_token) == ("auto", "skip")


def test_sweep_grid_auto_evaluates_each_recipes_default_strength(tmp_path, tokenizer):
    """``--grid caa+dsas=auto,1``: the dsas recipes are fitted with default_strength="auto"
    (the ungated ones are not), the point at each seed's own default λ is evaluated and marked,
    and a resumed sweep reads λ back from the saved recipe without refitting."""
    from steerwise.eval.cli import parse_grids
    from steerwise.recipe import Recipe

    grids = parse_grids(["caa=0.5", "caa+dsas=auto,1"], ["caa"], ["none", "dsas"])
    assert grids == {"caa": [0.0, 0.5], "caa+dsas": [0.0, 1.0, "auto"]}
    with pytest.raises(ValueError, match="numbers or 'auto'"):
        parse_grids(["caa=0.5,strong"], ["caa"])
    model = make_model("qwen2")
    cfg = SweepConfig(methods=["caa"], gates=["none", "dsas"], strengths=grids, seeds=[0, 1],
                      n_fit=4)
    asked = []

    class Fits(_Counter):
        def fit(self, model, tok, source, control, target, opts, progress=False):
            recipe = super().fit(model, tok, source, control, target, opts, progress)
            asked.append((opts.gate, opts.default_strength))
            if opts.default_strength == "auto":  # stands in for the held-out search
                recipe.default_strength = 0.25 + 0.5 * len(self.fits)
            return recipe

    c1, logs = Fits(), []
    kw = {"scorer": None, "progress": False}
    points = run_sweep(model, tokenizer, _sweep_data(), cfg, tmp_path, fit_fn=c1.fit,
                       eval_fn=c1.eval, log=logs.append, **kw)
    assert sorted(asked) == [("dsas", "auto")] * 2 + [("none", 1.0)] * 2
    defaults = sorted((p["seed"], p["strength"]) for p in points if p.get("default_strength"))
    lam = {seed: Recipe.from_pretrained(tmp_path / "recipes" / f"caa__dsas__seed{seed}")
           .default_strength for seed in (0, 1)}
    assert defaults == [(0, lam[0]), (1, lam[1])] and lam[0] != lam[1]
    assert any("default strength (auto)" in line for line in logs)
    # base + none λ 0.5 + dsas λ 1 + dsas λ auto, per seed
    assert len(points) == 8
    rows = aggregate(points)
    assert sum(bool(r.get("default_strength")) for r in rows) == 2
    c2 = Fits()
    again = run_sweep(model, tokenizer, _sweep_data(), cfg, tmp_path, fit_fn=c2.fit,
                      eval_fn=c2.eval, log=lambda s: None, **kw)
    assert c2.fits == [] and c2.evals == [] and len(again) == 8


class _RecordingSampler:
    """Stands in for the vLLM engine: records what the sweep asks and answers each request with
    text that says how it was steered ("toxic" for unsteered requests)."""

    def __init__(self):
        self.opened: list[tuple[dict, int]] = []
        self.batches: list[list] = []
        self.closed = 0

    def open(self, recipes, max_model_len):
        for path in recipes.values():
            assert (Path(path) / "steerwise.json").is_file()  # fitted and saved before the engine
        self.opened.append((dict(recipes), max_model_len))

    def sample(self, requests, config, *, progress=False):
        self.batches.append(list(requests))
        return ["toxic words" if r.recipe is None else f"kind {r.recipe} {r.strength:g}"
                for r in requests]

    def close(self):
        self.closed += 1


class _WordScorer:
    def score(self, texts):
        return [1.0 if "toxic" in t else 0.0 for t in texts]


def test_sweep_with_an_engine_samples_points_in_batches_and_resumes(tmp_path, tokenizer):
    """--engine vllm's plumbing: recipes are fitted and saved before the engine starts with all
    of them; each request carries its point's recipe, λ and seed; the continuations are kept in
    samples.jsonl, scored by the real evaluate_point, and never sampled twice."""
    from steerwise.eval.sweep.engines import request_seed
    from steerwise.eval.sweep.store import read_samples

    model = make_model("qwen2")
    data = SweepData(toxic_prompts=["the dog", "a cat", "one more"], benign_prompts=["hello"],
                     source_pool=[f"s{i}" for i in range(8)],
                     target_pool=[f"t{i}" for i in range(8)],
                     control_pool=[f"c{i}" for i in range(8)])
    cfg = SweepConfig(methods=["caa"], gates=["none", "dsas"], strengths={"caa": [0, 1, 2]},
                      seeds=[3], n_fit=4, engine="vllm",
                      generation=GenerationConfig(max_new_tokens=7, max_prompt_tokens=2))
    fits = _Counter()
    sampler = _RecordingSampler()
    kw = {"scorer": _WordScorer(), "progress": False, "log": lambda s: None, "fit_fn": fits.fit}
    points = run_sweep(model, tokenizer, data, cfg, tmp_path, sampler=sampler,
                       points_per_batch=3, **kw)
    assert len(points) == 5 and len(fits.fits) == 2
    (recipes, max_len), = sampler.opened
    assert set(recipes) == {"caa__none__seed3", "caa__dsas__seed3"}
    assert max_len <= 2 + 7 + 2  # prompts cut to 2 tokens (+ special tokens) + new tokens
    assert [len(b) for b in sampler.batches] == [3 * 4, 2 * 4]  # 5 points, 3 a batch, 4 prompts
    assert sampler.closed == 1
    reqs = [r for b in sampler.batches for r in b]
    assert {(r.recipe, r.strength) for r in reqs} == {
        (None, 0.0), ("caa__none__seed3", 1.0), ("caa__none__seed3", 2.0),
        ("caa__dsas__seed3", 1.0), ("caa__dsas__seed3", 2.0)}
    assert [r.seed for r in reqs[:4]] == [request_seed(3, i) for i in range(4)]
    assert all(len(tokenizer(r.prompt, add_special_tokens=False)["input_ids"]) <= 2
               for r in reqs)
    by_key = {(p["method"], p["gate"], p["strength"]): p for p in points}
    assert by_key[("base", "none", 0.0)]["toxicity"] == 1.0
    assert by_key[("base", "none", 0.0)]["benign_toxicity"] == 1.0
    assert by_key[("caa", "dsas", 2.0)]["toxicity"] == 0.0
    assert by_key[("caa", "dsas", 2.0)]["examples"][0]["continuation"] == "kind caa__dsas__seed3 2"
    assert all(p["engine"] == "vllm" and p["seconds"] >= p["sample_seconds"] >= 0
               for p in points)
    assert len(read_samples(tmp_path)) == 5

    # a point scored away but sampled (killed between sampling and scoring): not sampled again
    lines = (tmp_path / "points.jsonl").read_text().splitlines()
    (tmp_path / "points.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    again = _RecordingSampler()
    run_sweep(model, tokenizer, data, cfg, tmp_path, sampler=again, **kw)
    assert again.opened == [] and again.batches == [] and len(read_points(tmp_path)) == 5
    # a new λ: one more point, one engine start, only its prompts
    more = SweepConfig(**{**cfg.__dict__, "strengths": {"caa": [0, 1, 2, 4]}})
    run_sweep(model, tokenizer, data, more, tmp_path, sampler=again, **kw)
    assert [len(b) for b in again.batches] == [2 * 4] and len(read_points(tmp_path)) == 7
    # an engine's sweep does not mix with points sampled by another
    with pytest.raises(ValueError, match="other settings.*engine"):
        run_sweep(model, tokenizer, data, SweepConfig(**{**more.__dict__, "engine": "hf"}),
                  tmp_path, **kw)
    with pytest.raises(ValueError, match="no sampler was given"):
        run_sweep(model, tokenizer, data, more, tmp_path / "x", **kw)


def test_sweep_engine_vllm_refuses_a_gguf_or_a_missing_vllm(tmp_path):
    from steerwise.eval.sweep.engines import VllmSampler

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="HF directory"):
        VllmSampler(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="HF directory"):
        VllmSampler(tmp_path)  # no config.json
    try:
        import vllm  # noqa: F401
    except ImportError:
        (tmp_path / "config.json").write_text("{}")
        with pytest.raises(ImportError, match="pip install vllm"):
            VllmSampler(tmp_path)
