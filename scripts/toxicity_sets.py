"""Write toxicity fitting sets (.txt, one text per line) from the public data in ../shared/data.

    python scripts/toxicity_sets.py --data ../shared/data --out sets --n 64 --seed 0

writes ``toxic.txt`` (Davidson tweets labelled offensive or hate: the source S),
``nontoxic.txt`` (tweets labelled neither: the target T) and ``neutral.txt`` (WikiText-2 sentences
from articles the testbed was trained on, i.e. *not* the held-out articles 0, 10, 20, ...: the
control C). None of these rows are in the testbed's evaluation sets (held-out RTP rows and
held-out WikiText articles).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path


def wikitext_sentences(path: Path, held_out_every: int = 10) -> list[str]:
    """Sentences of 8-40 words from articles whose index is not a multiple of held_out_every."""
    article, out = -1, []
    for line in path.read_text(encoding="utf-8").splitlines():
        if re.fullmatch(r" = [^=].* = ", line):
            article += 1
            continue
        if article < 0 or article % held_out_every == 0 or line.startswith(" = "):
            continue
        for sent in re.split(r"(?<=[.!?]) ", line.strip()):
            if 8 <= len(sent.split()) <= 40 and "@" not in sent:
                out.append(sent)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="sets")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    rnd = random.Random(args.seed)
    tweets = [json.loads(line) for line in (data / "davidson_tweets.jsonl").open()]
    clean = [t for t in tweets if 5 <= len(t["text"].split()) <= 40]
    toxic = [t["text"] for t in clean if t["label"] in ("offensive", "hate")]
    nontoxic = [t["text"] for t in clean if t["label"] == "neither"]
    neutral = wikitext_sentences(data / "wikitext2_test.txt")
    out.mkdir(parents=True, exist_ok=True)
    for name, pool in (("toxic", toxic), ("nontoxic", nontoxic), ("neutral", neutral)):
        rows = [" ".join(r.split()) for r in rnd.sample(pool, args.n)]
        (out / f"{name}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
        print(f"{out / (name + '.txt')}: {len(rows)} texts (from {len(pool)})")


if __name__ == "__main__":
    main()
