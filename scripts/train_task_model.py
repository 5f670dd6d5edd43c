"""Train the small causal LM that can do both activation-scaling tasks (CCC and IOI).

Tiny random models cannot do Country-Capital Conflicts or Indirect Object Identification and no
pretrained checkpoint can be downloaded here, so this script trains one from scratch, on CPU,
deterministically, on generated text that contains both tasks:

* facts "the capital of X is Y" for every country of ``steerwise.tasks.ccc.COUNTRY_CAPITALS`` in
  varied templates;
* CCC passages: a context states a wrong capital, the question is answered with the *true*
  capital (the model must answer from memory) in 90 % of them and with the in-context city in
  10 % (``--context-rate``; keeps the conflict real: the in-context city keeps some probability
  and the clean logit difference stays moderate); some passages state the true capital in the
  context;
* copy passages: made-up countries whose "capital" (a real city) is stated in the context and must
  be copied (this gives the model an in-context copy mechanism that CCC pits against memory);
* IOI stories with random names, answered with the indirect object;
* neutral filler sentences, also as prefixes of CCC and IOI passages (varied prompt lengths).

Held out: CCC passages only use the *train* (country, wrong city) pairs and no IOI story uses two
*test* names, so no prompt of the generators' ``test`` split occurs in the training text (checked).

Output (``--out``, default ``steerwise/assets/task-lm``): a LlamaForCausalLM (4 layers, hidden 128,
MLP 256, 4 heads, tied embeddings, float32, safetensors; Llama rather than Qwen2 because
transformers 5 forces its byte-level Qwen2Tokenizer on every qwen2 checkpoint) and a word-level
``tokenizers`` tokenizer (case-sensitive, punctuation split off), loadable
offline with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``; plus a
README.md with the measured clean accuracy on the test splits.

Reproduce (one CPU thread; about 8 minutes of CPU time, 2,000 steps of 64 passages)::

    HF_HUB_OFFLINE=1 python scripts/train_task_model.py --out steerwise/assets/task-lm
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from steerwise.tasks.base import FILLER_SENTENCES, TaskExample
from steerwise.tasks.ccc import (
    CONTEXT_TEMPLATES,
    COUNTRY_CAPITALS,
    FICTIONAL_COUNTRIES,
    QUERY_TEMPLATES,
    ccc_examples,
    ccc_pairs,
)
from steerwise.tasks.ioi import (
    IOI_TEMPLATES,
    NAMES,
    OBJECTS,
    PLACES,
    ioi_examples,
    ioi_names,
    ioi_prompt,
)

EOS = "<|endoftext|>"
UNK = "<unk>"
WORD_RE = re.compile(r"\w+|[^\w\s]+")

# Plain statements of a fact (not in the CCC question format).
FACT_TEMPLATES = (
    "The capital of {country} is {city}.",
    "{city} is the capital of {country}.",
    "{country} has its capital in {city}.",
    "The capital city of {country} is {city}.",
    "{city} is a large city in {country}.",
    "Q: What is the capital of {country}? A: {city}.",
    "Q: Which is the capital of {country}? A: {city}.",
    "Q: Tell me the capital of {country}. A: {city}.",
)

# Passage mix (weights).
MIX = {
    "facts": 0.10,
    "ccc_conflict": 0.20,
    "ccc_consistent": 0.04,
    "copy": 0.08,
    "ioi": 0.54,
    "filler": 0.04,
}


# --------------------------------------------------------------------------------------------
# Corpus


class Corpus:
    """Deterministic generator of training passages (one passage = one training sequence)."""

    def __init__(self, seed: int, context_rate: float = 0.1):
        self.rng = random.Random(seed)
        self.context_rate = context_rate
        self.train_pairs = ccc_pairs("train")
        self.countries = sorted(COUNTRY_CAPITALS)
        self.cities = sorted(COUNTRY_CAPITALS.values())
        self.test_names = set(ioi_names("test"))
        self.kinds = list(MIX)
        self.weights = [MIX[k] for k in self.kinds]

    def _prefix(self) -> str:
        k = self.rng.choice([0, 0, 0, 1, 2])
        return "".join(s + " " for s in self.rng.sample(FILLER_SENTENCES, k))

    def _ccc(self, country: str, ctx_city: str, answer: str) -> str:
        rng = self.rng
        n_ctx = rng.choice([1, 1, 2, 3])
        ctx = " ".join(
            t.format(country=country, city=ctx_city) for t in rng.sample(CONTEXT_TEMPLATES, n_ctx)
        )
        query = rng.choice(QUERY_TEMPLATES).format(country=country)
        return f"{self._prefix()}{ctx} {query} {answer}."

    def passage(self) -> tuple[str, str]:
        rng = self.rng
        kind = rng.choices(self.kinds, self.weights)[0]
        if kind == "facts":
            sents = []
            for c in rng.sample(self.countries, rng.choice([1, 2, 3])):
                sents.append(rng.choice(FACT_TEMPLATES).format(country=c, city=COUNTRY_CAPITALS[c]))
            return kind, " ".join(sents)
        if kind == "ccc_conflict":
            country, city = rng.choice(self.train_pairs)
            # Mostly answered from memory; sometimes the context wins (as in real text), which
            # keeps the in-context city the runner-up and the clean logit difference moderate.
            answer = city if rng.random() < self.context_rate else COUNTRY_CAPITALS[country]
            return kind, self._ccc(country, city, answer)
        if kind == "ccc_consistent":
            country = rng.choice(self.countries)
            cap = COUNTRY_CAPITALS[country]
            return kind, self._ccc(country, cap, cap)
        if kind == "copy":
            country = rng.choice(FICTIONAL_COUNTRIES)
            city = rng.choice(self.cities)
            return kind, self._ccc(country, city, city)
        if kind == "ioi":
            while True:
                io, subject = rng.sample(NAMES, 2)
                if not (io in self.test_names and subject in self.test_names):
                    break
            story = ioi_prompt(
                io,
                subject,
                rng.choice(["ABBA", "BABA"]),
                rng.choice(IOI_TEMPLATES),
                rng.choice(PLACES),
                rng.choice(OBJECTS),
                prefix=self._prefix(),
            )
            return kind, f"{story} {io}."
        k = rng.choice([1, 2, 3])
        return kind, " ".join(rng.sample(FILLER_SENTENCES, k))


def vocabulary() -> list[str]:
    """Every word the corpus and the task generators can produce (sorted, deterministic)."""
    texts: list[str] = list(FILLER_SENTENCES) + list(FACT_TEMPLATES) + list(CONTEXT_TEMPLATES)
    texts += list(QUERY_TEMPLATES) + list(IOI_TEMPLATES)
    words: set[str] = set()
    for t in texts:
        words.update(WORD_RE.findall(re.sub(r"\{\w+\}", " ", t)))
    words.update(COUNTRY_CAPITALS)
    words.update(COUNTRY_CAPITALS.values())
    words.update(FICTIONAL_COUNTRIES)
    words.update(NAMES)
    words.update(PLACES)
    words.update(OBJECTS)
    return [EOS, UNK] + sorted(words)


def build_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        model_max_length=256,
    )


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def clean_accuracy(model, tokenizer, examples: list[TaskExample]) -> tuple[float, float]:
    """Share of prompts with logit(correct) > logit(wrong) at the last position; mean difference."""
    enc = tokenizer([e.prompt for e in examples], return_tensors="pt", padding=False)
    logits = model(input_ids=enc["input_ids"]).logits[:, -1]
    c = torch.tensor([tokenizer.convert_tokens_to_ids(e.correct) for e in examples])
    w = torch.tensor([tokenizer.convert_tokens_to_ids(e.wrong) for e in examples])
    idx = torch.arange(len(examples))
    diff = logits[idx, c] - logits[idx, w]
    return (diff > 0).float().mean().item(), diff.mean().item()


def eval_sets(n: int = 500) -> dict[str, list[TaskExample]]:
    return {
        "ccc": ccc_examples(n, seed=0, split="test"),
        "ccc_3ctx_2fill": ccc_examples(
            n, seed=0, split="test", n_context_sentences=3, prefix_sentences=2
        ),
        "ioi": ioi_examples(n, seed=0, split="test"),
        "ioi_2fill": ioi_examples(n, seed=0, split="test", prefix_sentences=2),
        "ccc_train": ccc_examples(n, seed=0, split="train"),
        "ioi_train": ioi_examples(n, seed=0, split="train"),
    }


# --------------------------------------------------------------------------------------------
# README


def write_readme(out: Path, st: dict) -> None:
    ev = st["final_eval_500"]

    def row(key: str, what: str) -> str:
        r = ev[key]
        return f"| {what} | {r['clean_accuracy']:.3f} | {r['mean_logit_diff']:.2f} |"

    mix = ", ".join(f"{k} {v:.0%}" for k, v in MIX.items())
    text = f"""# task-lm: a small causal LM that does CCC and IOI

Trained from scratch by `scripts/train_task_model.py` so that activation scaling
(`steerwise` §3, Stoehr et al. 2024) has a model that actually solves its two tasks offline:
Country-Capital Conflicts (`steerwise.tasks.ccc`) and Indirect Object Identification
(`steerwise.tasks.ioi`). Load it like any checkpoint (no network needed):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("steerwise/assets/task-lm")
model = AutoModelForCausalLM.from_pretrained("steerwise/assets/task-lm")
```

## Model and tokenizer

`LlamaForCausalLM`: {st["layers"]} layers, hidden {st["hidden"]}, {st["heads"]} heads, MLP {st["mlp"]},
tied embeddings, RoPE, float32 safetensors, {st["params"] / 1e6:.2f} M parameters.
Tokenizer: word-level (`tokenizers` WordLevel, `Whitespace` pre-tokenizer: a token is a run of
letters/digits or of punctuation; case-sensitive), {st["vocab_size"]} tokens, `<|endoftext|>` = id 0
(BOS/EOS/PAD), `<unk>` = id 1. No special tokens are added to prompts. Every country, capital,
made-up country, name, place and object of the task generators is one token, and
`" " + word` encodes to that same token, so `steerwise.tasks.base.check_single_token` passes.
A prompt's token count equals `steerwise.tasks.base.count_words(prompt)`. It knows only the
vocabulary of its corpus: any other word is `<unk>`.

## Training text (generated on the fly, seed {st["seed"]})

One passage per sequence, no BOS; passage mix: {mix}.

- **facts**: 1–3 sentences "The capital of X is Y." in 8 templates (incl. the CCC question format
  with its answer), all {len(COUNTRY_CAPITALS)} countries of `COUNTRY_CAPITALS`.
- **ccc_conflict**: 0–2 filler sentences, 1–3 context sentences asserting a wrong capital, a
  CCC question, answered with the true capital ({1 - st["context_rate"]:.0%}) or the in-context
  city ({st["context_rate"]:.0%}). Only *train* (country, wrong city) pairs are used.
- **ccc_consistent**: the same with the true capital in the context.
- **copy**: the same for made-up countries (`FICTIONAL_COUNTRIES`) with a random real capital
  in the context, which is the answer: an in-context copy mechanism that CCC pits against memory.
- **ioi**: 0–2 filler sentences + an IOI story from the 6 generator templates (ABBA and BABA) +
  the indirect object. Never two *test* names in one story.
- **filler**: 1–3 neutral filler sentences.

Loss: next-token cross-entropy on every token, the answer token of task passages weighted
×{st["answer_weight"]:g}. AdamW (lr {st["lr"]:g}, warm-up 5 %, cosine to 5 %, weight decay 0.05 on
matrices, grad clip 1), batch {st["batch"]}, {st["steps"]} steps.

Held out: no prompt of the generators' `test` split occurs in the training text (the script
asserts it on 20,000 sampled passages; by construction test CCC pairs and test-name IOI pairs
never occur).

## Reproduce

```bash
{st["command"]}
```

Deterministic (fixed seeds, `torch.use_deterministic_algorithms`, {st["threads"]} thread); torch
{st["torch"]}. Training took {st["wall_s"] / 60:.1f} min wall clock / {st["cpu_s"] / 60:.1f} min
CPU time on one thread of a shared 2-core Xeon (the wall time includes waiting for other jobs on
the machine). Final training loss (EMA): {st["final_loss_ema"]:.3f}.

## Clean accuracy (measured by the training script)

Share of prompts with logit(correct) > logit(wrong) at the last position, and mean of
logit(correct) − logit(wrong); 500 prompts each, `seed=0`.

| prompts | clean accuracy | mean logit diff |
|---|---|---|
{row("ccc", "CCC test split (18 tokens)")}
{row("ccc_3ctx_2fill", "CCC test, 3 context + 2 filler sentences (44 tokens)")}
{row("ioi", "IOI test split (14 tokens)")}
{row("ioi_2fill", "IOI test, 2 filler sentences (26 tokens)")}
{row("ccc_train", "CCC train split")}
{row("ioi_train", "IOI train split")}

Learning curve (200 prompts each; `[accuracy, mean logit diff]`) and all settings:
`train_stats.json`.
"""
    (out / "README.md").write_text(text)


# --------------------------------------------------------------------------------------------
# Training


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "steerwise" / "assets" / "task-lm"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=256, help="MLP (intermediate) size")
    ap.add_argument(
        "--context-rate",
        type=float,
        default=0.1,
        help="share of CCC conflict passages answered with the in-context city",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument(
        "--answer-weight",
        type=float,
        default=5.0,
        help="loss weight of the answer token of task passages (others: 1)",
    )
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    words = vocabulary()
    tokenizer = build_tokenizer(words)
    vocab_size = len(words)

    # Held-out check: no evaluation prompt occurs in (a large sample of) the training text.
    evals = eval_sets()
    test_prompts = [e.prompt for k, v in evals.items() if "train" not in k for e in v]
    test_prompts += [e.prompt for e in ccc_examples(50, seed=0, split="test")]
    test_prompts += [e.prompt for e in ioi_examples(50, seed=0, split="test")]
    probe = Corpus(args.seed, args.context_rate)
    sample = [probe.passage()[1] for _ in range(20000)]
    joined = "\n".join(sample)
    leaks = [p for p in set(test_prompts) if p in joined]
    assert not leaks, f"test prompts in the training text: {leaks[:3]}"
    unk_words = {w for s in sample[:2000] for w in WORD_RE.findall(s)} - set(words)
    assert not unk_words, unk_words

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        rms_norm_eps=1e-6,
        use_cache=True,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {vocab_size}, params {n_params / 1e6:.2f} M", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    corpus = Corpus(args.seed, args.context_rate)
    t0 = time.time()
    c0 = time.process_time()
    model.train()
    ema = None
    history = []
    for step in range(args.steps):
        passages = [corpus.passage() for _ in range(args.batch)]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [0] for _, t in passages]
        L = max(len(x) for x in ids)
        inp = torch.zeros(len(ids), L, dtype=torch.long)
        weight = torch.zeros(len(ids), L)
        for i, ((kind, _), x) in enumerate(zip(passages, ids)):
            inp[i, : len(x)] = torch.tensor(x)
            weight[i, 1 : len(x)] = 1.0  # weight of predicting token j (from position j - 1)
            if kind not in ("facts", "filler"):
                weight[i, len(x) - 3] = args.answer_weight  # "... A: Paris . <eos>"
        logits = model(input_ids=inp).logits[:, :-1]
        w = weight[:, 1:]
        nll = F.cross_entropy(
            logits.reshape(-1, vocab_size), inp[:, 1:].reshape(-1), reduction="none"
        ).view_as(w)
        loss = (nll * w).sum() / w.sum()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if (step + 1) % 100 == 0:
            print(
                f"step {step + 1} loss {loss.item():.4f} ema {ema:.4f} {time.time() - t0:.0f}s",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            res = {k: clean_accuracy(model, tokenizer, v[:200]) for k, v in evals.items()}
            model.train()
            history.append(
                {
                    "step": step + 1,
                    "loss_ema": round(ema, 4),
                    **{k: [round(a, 3), round(d, 2)] for k, (a, d) in res.items()},
                }
            )
            print("  eval", json.dumps(history[-1]), flush=True)
    wall = time.time() - t0
    cpu = time.process_time() - c0

    # Final evaluation on the full evaluation sets.
    model.eval()
    final = {k: clean_accuracy(model, tokenizer, v) for k, v in evals.items()}
    for k, (a, d) in final.items():
        print(f"final {k}: acc {a:.3f} mean logit diff {d:.2f}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    stats = {
        "command": "HF_HUB_OFFLINE=1 python scripts/train_task_model.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "answer_weight": args.answer_weight,
        "context_rate": args.context_rate,
        "layers": args.layers,
        "hidden": args.hidden,
        "heads": args.heads,
        "mlp": args.mlp,
        "seed": args.seed,
        "threads": args.threads,
        "params": n_params,
        "vocab_size": vocab_size,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "final_loss_ema": round(ema, 4),
        "final_eval_500": {
            k: {"clean_accuracy": round(a, 4), "mean_logit_diff": round(d, 3)}
            for k, (a, d) in final.items()
        },
        "history": history,
        "torch": torch.__version__,
    }
    (out / "train_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    write_readme(out, stats)
    print(f"saved to {out}; training took {wall:.0f}s wall, {cpu:.0f}s CPU", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
