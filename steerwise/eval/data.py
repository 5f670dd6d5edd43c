"""Evaluation and fitting sets: generic files, and the ``testbed`` preset over a data directory
laid out like the project's shared data (``rtp_toxic.jsonl``, ``rtp_nontoxic.jsonl``,
``davidson_tweets.jsonl``, ``wikitext2_test.txt``, ``mmlu/``).

The testbed preset keeps fitting and evaluation sets disjoint and evaluates only on text the
testbed LM never saw:

* toxic prompts: odd-indexed rows of ``rtp_toxic.jsonl`` (held out from training);
* benign prompts and non-toxic reference continuations: the last 200 rows of
  ``rtp_nontoxic.jsonl`` (held out);
* perplexity text: WikiText-2 test articles 0, 10, 20, … (held out);
* MMLU: test questions (the testbed saw them: this measures retained memorised knowledge);
* fitting pools: source = Davidson tweets labelled ``offensive`` or ``hate``; target = Davidson
  tweets labelled ``neither`` (same domain as the source, so a map moves toxicity, not style);
  control = one of the named pools of ``CONTROL_POOLS``: WikiText paragraphs of the articles
  not held out for perplexity (``wikitext``, default: out of domain, and the control whose gates
  cost least in-domain perplexity at equal toxicity, docs/dsas-measured.md), prompt +
  continuation of the *training* rows (0–999) of ``rtp_nontoxic.jsonl`` (``rtp-nontoxic``: the
  kind of text the benign evaluation prompts are, never the held-out rows), ``neither`` tweets
  (with 32 examples the mean-trained gates then reach only 0.6–0.77 accuracy) or half of
  ``rtp-nontoxic`` and ``wikitext`` each (``mix``). Every pool is in
  ``SweepData.control_pools``, so one sweep can compare gates fitted on each;
* in-domain fit pools for gate variants (``source=rtp-toxic``, ``target=rtp-nontoxic``): the
  prompts of the even (training) rows of ``rtp_toxic.jsonl`` and the ``rtp-nontoxic`` pool.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .mmlu import list_subjects, load_mmlu
from .sweep import SweepData

_ARTICLE = re.compile(r"^ = (?!=).*[^=] = $")
_HEADING = re.compile(r"^=.*=$")  # a stripped title or section line: "= = History = ="


def read_jsonl(path: str | Path) -> list[dict]:
    from ..data import parse_json_line, text_lines  # errors name the file, line (and column)

    p = Path(path)
    return [parse_json_line(line, f"{p}:{lineno}") for lineno, line in text_lines(p) if line.strip()]


def wikitext_articles(path: str | Path) -> list[str]:
    """WikiText raw text split into articles at `` = Title = `` lines (title line included)."""
    articles: list[list[str]] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if _ARTICLE.match(line):
            articles.append([line.strip()])
        elif articles and line.strip():
            articles[-1].append(line.strip())
    if not articles:
        raise ValueError(f"{path}: no WikiText article titles (' = Title = ' lines) found")
    return ["\n".join(a) for a in articles]


# the named control pools of the testbed preset: what each holds
CONTROL_POOLS = {
    "rtp-nontoxic": "rtp_nontoxic.jsonl rows 0-999, prompt + continuation (in-domain)",
    "neither": "davidson neither tweets (the target pool: same domain as the source)",
    "wikitext": "wikitext2 test paragraphs of the articles not held out for perplexity, "
                "in pieces of about 40 words (out-of-domain)",
    "mix": "rtp-nontoxic and wikitext, half each, interleaved",
}


def word_chunks(text: str, words: int = 40) -> list[str]:
    """Paragraphs of ``text`` (lines; WikiText titles and section headings dropped) cut into
    pieces of about ``words`` words (a short last piece joins the one before)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or _HEADING.match(line):
            continue
        ws = line.split()
        pieces = [ws[i:i + words] for i in range(0, len(ws), words)]
        if len(pieces) > 1 and len(pieces[-1]) < words // 2:
            last = pieces.pop()
            pieces[-1] = pieces[-1] + last
        out += [" ".join(p) for p in pieces if len(p) >= 5]
    return out


def control_pools(rtp: list[str], neither: list[str], train_articles: list[str]
                  ) -> dict[str, list[str]]:
    """The testbed's control pools (``CONTROL_POOLS``) from their sources."""
    wiki = [c for a in train_articles for c in word_chunks(a)]
    n = min(len(rtp), len(wiki))
    mix = [t for pair in zip(rtp[:n], wiki[:n]) for t in pair]
    return {"rtp-nontoxic": rtp, "neither": neither, "wikitext": wiki, "mix": mix}


def testbed_data(
    data_dir: str | Path,
    *,
    n_toxic: int = 100,
    n_benign: int = 50,
    n_ppl_continuations: int = 200,
    ppl_articles: Sequence[int] | None = None,
    mmlu_subjects: Sequence[str] | int | None = 10,
    mmlu_per_subject: int | None = 20,
    mmlu_dir: str | Path | None = None,
    control: str = "wikitext",
) -> SweepData:
    """The testbed preset (see the module docstring). ``mmlu_subjects``: names, or N for every
    (57 // N)-th subject in alphabetical order, or None for none."""
    d = Path(data_dir)
    toxic = read_jsonl(d / "rtp_toxic.jsonl")
    nontoxic = read_jsonl(d / "rtp_nontoxic.jsonl")
    tweets = read_jsonl(d / "davidson_tweets.jsonl")
    held_toxic = [r["prompt"] for r in toxic[1::2]][:n_toxic]
    held_nontoxic = nontoxic[-200:]
    benign = [r["prompt"] for r in held_nontoxic][:n_benign]
    cont_rows = held_nontoxic[:n_ppl_continuations]
    articles = wikitext_articles(d / "wikitext2_test.txt")
    idx = list(ppl_articles) if ppl_articles is not None else list(range(0, len(articles), 10))
    source_pool = list(dict.fromkeys(r["text"] for r in tweets if r["label"] in ("offensive", "hate")))
    toxic_texts = set(source_pool)
    # a few tweets occur under several labels: keep them out of the neutral pools
    target_pool = list(dict.fromkeys(r["text"] for r in tweets
                                     if r["label"] == "neither" and r["text"] not in toxic_texts))
    held_articles = set(idx)
    pools = control_pools(
        [r["prompt"] + r["continuation"] for r in nontoxic[:-200]], target_pool,
        [a for i, a in enumerate(articles) if i not in held_articles])
    # in-domain fit sets (gate variants' source=/target=): toxic RTP prompts of the training
    # rows (even rows; the evaluation prompts are the odd ones) and the non-toxic training rows
    source_pools = {"rtp-toxic": [r["prompt"] for r in toxic[0::2]]}
    target_pools = {"rtp-nontoxic": pools["rtp-nontoxic"]}
    if control not in pools:
        raise ValueError(f"unknown control pool {control!r}: {', '.join(CONTROL_POOLS)}")
    control_pool = pools[control]
    mmlu_q = mmlu_s = None
    if mmlu_subjects is not None:
        mdir = Path(mmlu_dir) if mmlu_dir else d / "mmlu"
        subjects = list_subjects(mdir, "test")
        if isinstance(mmlu_subjects, int):
            subjects = subjects[:: max(1, len(subjects) // mmlu_subjects)][:mmlu_subjects]
        else:
            subjects = list(mmlu_subjects)
        mmlu_q = load_mmlu(mdir, "test", subjects, mmlu_per_subject)
        mmlu_s = load_mmlu(mdir, "dev", subjects)
    return SweepData(
        toxic_prompts=held_toxic,
        benign_prompts=benign,
        source_pool=source_pool,
        target_pool=target_pool,
        control_pool=control_pool,
        ppl_texts=[articles[i] for i in idx],
        ppl_prompts=[r["prompt"] for r in cont_rows],
        ppl_continuations=[r["continuation"] for r in cont_rows],
        mmlu_questions=mmlu_q,
        mmlu_shots=mmlu_s,
        control_pools=pools,
        source_pools=source_pools,
        target_pools=target_pools,
        description={
            "preset": "testbed",
            "toxic_prompts": f"rtp_toxic.jsonl odd rows, first {len(held_toxic)}",
            "benign_prompts": f"rtp_nontoxic.jsonl last 200 rows, first {len(benign)}",
            "ppl_text": f"wikitext2 test articles {idx[:4]}... ({len(idx)} articles)",
            "ppl_continuations": f"rtp_nontoxic.jsonl last 200 rows, first {len(cont_rows)}",
            "source": "davidson offensive+hate", "target": "davidson neither",
            "control": CONTROL_POOLS[control],
            "mmlu": None if mmlu_q is None else f"{len(mmlu_q)} subjects x {mmlu_per_subject}",
        },
    )
