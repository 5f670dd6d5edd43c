"""Both MMLU backends of the sweep on one model, unsteered: accuracy and wall time.

    python scripts/mmlu_backends.py --model ../shared/testbed/tox-qwen2-7m \
        --mmlu-dir ../shared/data/mmlu --subjects 10 --per-subject 20

Needs steerwise[harness]. Subjects are spread alphabetically as in ``steerwise sweep``.
"""

from __future__ import annotations

import argparse
import time

import torch

from steerwise.eval.mmlu import evaluate_mmlu, list_subjects, load_mmlu, model_choice_scorer
from steerwise.harness import mmlu_accuracy
from steerwise.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--mmlu-dir", required=True)
    p.add_argument("--subjects", type=int, default=10)
    p.add_argument("--per-subject", type=int, default=20)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    subjects = list_subjects(args.mmlu_dir)
    subjects = subjects[:: max(1, len(subjects) // args.subjects)][: args.subjects]
    questions = load_mmlu(args.mmlu_dir, "test", subjects, args.per_subject)
    shots = load_mmlu(args.mmlu_dir, "dev", subjects)
    model, tok = load_model(args.model, device="cpu")
    t0 = time.perf_counter()
    hand = evaluate_mmlu(questions, model_choice_scorer(model, tok, max_length=args.max_length),
                         shots=shots, k=args.shots)
    t_hand = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc, n, per_subject = mmlu_accuracy(model, tok, None, None, questions, shots, k=args.shots,
                                        max_length=args.max_length)
    t_lm = time.perf_counter() - t0
    print(f"subjects: {', '.join(subjects)}")
    print(f"steerwise: accuracy {hand.accuracy:.4f} on {hand.n} questions, {t_hand:.1f} s")
    print(f"lm-eval:   accuracy {acc:.4f} on {n} questions, {t_lm:.1f} s")
    same = all(abs(hand.per_subject[s] - per_subject[s]) < 1e-9 for s in subjects)
    print(f"per-subject accuracies identical: {same}")


if __name__ == "__main__":
    main()
