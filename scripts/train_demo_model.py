"""Train steerwise's embedded demo model: a tiny word-level Llama on the concept world.

The model (``steerwise/assets/concept-lm/``) lets the demo run offline: it knows the topics of
:mod:`steerwise.tasks.concepts` (fruit, animals, vehicles, weather, music, sports), says "pear"
rarely, and a CAA vector fitted on ``demo_sets()`` makes it say "pear" everywhere -- which a DSAS
gate then restricts to fruit contexts.

Reproduce (about 6 CPU-minutes on one thread -- 351 s user time measured, 14 min wall on a
machine shared with other jobs; bit-for-bit deterministic on a given machine/torch build)::

    HF_HUB_OFFLINE=1 python scripts/train_demo_model.py            # train, save, run the checks
    HF_HUB_OFFLINE=1 python scripts/train_demo_model.py --check-only   # only the checks

Options: ``--out DIR`` (default ``steerwise/assets/concept-lm``), ``--steps N`` (default 2000),
``--no-check`` (skip the quality checks after training).

What is written: ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32),
``tokenizer.json``, ``tokenizer_config.json`` -- loadable with ``AutoModelForCausalLM`` and
``AutoTokenizer`` without network access. The tokenizer is word-level (``tokenizers``
``WordLevel`` with a lower-casing normalizer and a whitespace/punctuation pre-tokenizer), prepends
``<bos>`` to every text, pads on the left by default and decodes to plain text
("the farmer sold a pear.").

The quality checks print: greedy and sampled continuations per topic; the unsteered rate of "pear" in
sampled continuations per topic; per-layer cross-validated accuracy of a logistic probe fruit vs
other topics on mean-pooled residual activations; the "pear" rate under CAA steering
(v = mean(target) - mean(source) of mean-pooled layer outputs, ``demo_sets(32)``, added to the
outputs of ``model.model.layers[0..L-2]``) for a few strengths. The numbers measured on the shipped
model are in ``steerwise/assets/concept-lm/README.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steerwise.tasks import concepts

DEFAULT_OUT = ROOT / "steerwise" / "assets" / "concept-lm"
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD, UNK, BOS, EOS = range(4)

SEED = 1234
N_SENTENCES = 120_000
BATCH = 32
LR = 3e-3
WARMUP = 100
MAX_SEQ_SENTENCES = 4


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every word the concept world can produce."""
    vocab_words = list(SPECIALS) + [".", ","] + concepts.vocabulary()
    vocab = {w: i for i, w in enumerate(vocab_words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS)]
    )
    # WordPiece's decoder joins with spaces and (cleanup=True) glues "." and "," to the word before.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=256,
    )
    return fast


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def build_sequences(tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    """bos + 1-4 consecutive corpus sentences + eos, as token ids."""
    sents = concepts.corpus(N_SENTENCES, seed=0)
    rng = random.Random(f"chunks:{SEED}")
    texts: list[str] = []
    i = 0
    while i < len(sents):
        k = rng.randint(1, MAX_SEQ_SENTENCES)
        texts.append(" ".join(sents[i : i + k]))
        i += k
    enc = tokenizer(texts, add_special_tokens=True)["input_ids"]
    for ids in enc:
        assert UNK not in ids
        ids.append(EOS)
    return enc


def batches(seqs: list[list[int]], steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = random.Random(f"batches:{SEED}")
    order: list[int] = []
    out = []
    for _ in range(steps):
        if len(order) < BATCH:
            perm = list(range(len(seqs)))
            rng.shuffle(perm)
            order.extend(perm)
        idx, order = order[:BATCH], order[BATCH:]
        rows = [seqs[j] for j in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        out.append((ids, mask))
    return out


# ---------------------------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------------------------


def build_model(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        initializer_range=0.02,
    )
    return LlamaForCausalLM(config)


def train(out: Path, steps: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    random.seed(SEED)
    t0 = time.time()
    tokenizer = build_tokenizer()
    seqs = build_sequences(tokenizer)
    n_tok = sum(len(s) for s in seqs)
    print(f"vocab {len(tokenizer)}  sequences {len(seqs)}  tokens {n_tok}", flush=True)
    model = build_model(len(tokenizer))
    n_par = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_par}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        prog = (step - WARMUP) / max(1, steps - WARMUP)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * prog))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    ema = None
    losses: list[float] = []
    for step, (ids, mask) in enumerate(batches(seqs, steps)):
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  ema {ema:.4f}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    final = sum(losses[-100:]) / len(losses[-100:])
    model.eval()
    # Held-out loss on fresh text (a different seed stream).
    held = concepts.corpus(2000, seed=99)
    texts = [" ".join(held[i : i + 3]) for i in range(0, len(held), 3)]
    enc = tokenizer(texts)["input_ids"]
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(enc), 64):
            rows = [e + [EOS] for e in enc[i : i + 64]]
            ids, mask = batches_from(rows)
            labels = ids.masked_fill(mask == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            tot += model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * n
            cnt += n
    print(f"final training loss (mean of last 100 steps): {final:.4f}")
    print(f"held-out loss (corpus seed 99): {tot / cnt:.4f}  perplexity {math.exp(tot / cnt):.2f}")

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=20
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for extra in ("chat_template.jinja",):
        (out / extra).unlink(missing_ok=True)
    size = (out / "model.safetensors").stat().st_size
    print(f"saved to {out}  model.safetensors {size / 1e6:.2f} MB  wall {time.time() - t0:.0f}s")


def batches_from(rows: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        sl = slice(width - len(row), width) if left else slice(0, len(row))
        ids[r, sl] = torch.tensor(row)
        mask[r, sl] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Quality checks
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def pooled_hidden(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """(n_layers + 1, n_texts, d): masked mean over tokens of every hidden state."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    hs = model(**enc, output_hidden_states=True).hidden_states
    m = enc["attention_mask"].unsqueeze(-1).float()
    return torch.stack([(h.float() * m).sum(1) / m.sum(1) for h in hs])


def pear_rate(model, tokenizer, prompts: list[str], samples: int, seed: int) -> tuple[float, list[str]]:
    torch.manual_seed(seed)
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    gen = model.generate(
        **enc, do_sample=True, top_p=0.9, temperature=1.0, max_new_tokens=20,
        num_return_sequences=samples,
    )
    conts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    hits = [concepts.STEER_WORD in concepts.words(c) for c in conts]
    return sum(hits) / len(hits), conts


class _Steer:
    """Adds ``strength * v[l]`` to the output of ``model.model.layers[l]`` (tensor or tuple)."""

    def __init__(self, model, vectors: dict[int, torch.Tensor], strength: float) -> None:
        self.handles = []
        for layer, v in vectors.items():
            self.handles.append(
                model.model.layers[layer].register_forward_hook(self._hook(v, strength))
            )

    @staticmethod
    def _hook(v: torch.Tensor, strength: float):
        def hook(_mod, _inp, out):
            if isinstance(out, tuple):
                return (out[0] + strength * v.to(out[0].dtype),) + out[1:]
            return out + strength * v.to(out.dtype)

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def check(out: Path) -> None:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    torch.set_num_threads(1)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    n_layers = model.config.num_hidden_layers
    prompts = concepts.demo_prompts(seed=0, n_per_topic=10)
    big_prompts = concepts.demo_prompts(seed=1, n_per_topic=40)

    print("\n== greedy continuations (3 prompts per topic) ==")
    for topic, ps in prompts.items():
        enc = tokenizer(ps[:3], return_tensors="pt", padding=True)
        gen = model.generate(**enc, do_sample=False, max_new_tokens=20)
        for p, c in zip(ps[:3], tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:],
                                                       skip_special_tokens=True)):
            print(f"[{topic}] {p} || {c}")

    print("\n== unsteered 'pear' rate, sampled (top_p 0.9, 20 new tokens, 40 prompts x 5) ==")
    base: dict[str, float] = {}
    for topic, ps in big_prompts.items():
        rate, conts = pear_rate(model, tokenizer, ps, samples=5, seed=0)
        base[topic] = rate
        print(f"{topic:9s} {rate:.3f}   e.g. {ps[0]} || {conts[0]}")

    print("\n== probe fruit vs other topics, mean-pooled hidden states, 5-fold CV ==")
    fruit = concepts.topic_sentences("fruit", 200, seed=7)
    others = [s for t in concepts.TOPICS if t != "fruit"
              for s in concepts.topic_sentences(t, 40, seed=7)]
    hf = pooled_hidden(model, tokenizer, fruit)
    ho = pooled_hidden(model, tokenizer, others)
    y = np.array([1] * len(fruit) + [0] * len(others))
    for layer in range(n_layers + 1):
        x = torch.cat([hf[layer], ho[layer]]).numpy()
        acc = cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=5).mean()
        print(f"hidden_states[{layer}]  acc {acc:.3f}")

    print("\n== CAA steering: v = mean(target) - mean(source) (demo_sets n=32), added to the"
          " outputs of layers 0..L-2 ==")
    sets = concepts.demo_sets(32, seed=0)
    ht = pooled_hidden(model, tokenizer, sets["target"])
    hs_ = pooled_hidden(model, tokenizer, sets["source"])
    vectors = {l: (ht[l + 1].mean(0) - hs_[l + 1].mean(0)) for l in range(n_layers - 1)}
    for l, v in vectors.items():
        print(f"layer {l}: |v| {v.norm():.2f}  mean |h| {hs_[l + 1].norm(dim=-1).mean():.2f}")
    for strength in (2.0, 4.0, 6.0, 8.0, 12.0):
        rates = {}
        with _Steer(model, vectors, strength):
            examples = {}
            for topic, ps in prompts.items():
                rates[topic], conts = pear_rate(model, tokenizer, ps, samples=4, seed=1)
                examples[topic] = f"{ps[0]} || {conts[0]}"
        allr = sum(rates.values()) / len(rates)
        print(f"strength {strength:4.1f}  all {allr:.3f}  " +
              "  ".join(f"{t} {r:.2f}" for t, r in rates.items()))
        for topic in ("fruit", "vehicles"):
            print(f"      e.g. [{topic}] {examples[topic]}")
    print(f"checks took {time.time() - t0:.0f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--check-only", action="store_true", help="skip training, run the checks")
    ap.add_argument("--no-check", action="store_true", help="skip the checks after training")
    args = ap.parse_args()
    if not args.check_only:
        train(args.out, args.steps)
    if not args.no_check:
        check(args.out)


if __name__ == "__main__":
    main()
