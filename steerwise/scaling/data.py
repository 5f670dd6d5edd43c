"""Task examples → token tensors, and the answer-position forward pass.

Prompts are tokenized with the tokenizer's special tokens and left-padded to a common width, so
the last column is always the answer position and (with position ids from the mask) a padded
row sees the same positions it would alone. Answers are the single token of ``" " + word``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..activations import ensure_pad_token, forward_kwargs
from ..tasks.base import TaskExample, answer_token_ids, check_single_token, load_task_jsonl

TASKS = ("ccc", "ioi")


@dataclass
class EncodedTask:
    ids: Tensor  # (n, width) left-padded token ids
    mask: Tensor  # (n, width)
    correct: Tensor  # (n,) token ids
    wrong: Tensor  # (n,)
    lengths: Tensor  # (n,) prompt lengths in tokens

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    def rows(self, index: Tensor | slice) -> EncodedTask:
        return EncodedTask(self.ids[index], self.mask[index], self.correct[index],
                           self.wrong[index], self.lengths[index])


def encode_examples(
    tokenizer, examples: Sequence[TaskExample], width: int | None = None
) -> EncodedTask:
    """Tokenize prompts (left-padded to ``width``, default the longest) and answer tokens."""
    if not examples:
        raise ValueError("no task examples given")
    ensure_pad_token(tokenizer)
    check_single_token(examples, tokenizer)
    rows = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise ValueError("a prompt is empty after tokenization")
    w = max(lengths) if width is None else int(width)
    if max(lengths) > w:
        i = lengths.index(max(lengths))
        raise ValueError(
            f"prompt #{i} has {lengths[i]} tokens, more than the {w} positions allowed "
            f"({examples[i].prompt!r})"
        )
    ids = torch.full((len(rows), w), int(tokenizer.pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), w), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, w - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, w - len(r):] = 1
    correct = torch.tensor([answer_token_ids(e.correct, tokenizer)[0] for e in examples])
    wrong = torch.tensor([answer_token_ids(e.wrong, tokenizer)[0] for e in examples])
    return EncodedTask(ids, mask, correct, wrong, torch.tensor(lengths))


def answer_logits(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """Float32 next-token logits at the last column, (batch, V)."""
    device = next(model.parameters()).device
    kwargs = forward_kwargs(model, ids.to(device), mask.to(device))
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return model(**kwargs).logits[:, -1].float()


def load_task(
    task: str,
    n: int = 64,
    *,
    seed: int = 0,
    split: str = "train",
    prefix_sentences: int = 0,
) -> list[TaskExample]:
    """Examples of a named task (``ccc``, ``ioi``) or all rows of a JSONL file.

    For the generators, ``n``, ``seed``, ``split`` and ``prefix_sentences`` (neutral filler
    sentences before the prompt, 6 words each: another prompt length) apply; a file is read
    whole (one ``{"prompt", "correct", "wrong"}`` object per line).
    """
    if task == "ccc":
        from ..tasks.ccc import ccc_examples

        return ccc_examples(n, seed=seed, split=split, prefix_sentences=prefix_sentences)
    if task == "ioi":
        from ..tasks.ioi import ioi_examples

        return ioi_examples(n, seed=seed, split=split, prefix_sentences=prefix_sentences)
    path = Path(task)
    if not path.is_file():
        raise FileNotFoundError(
            f"task {task!r} is neither a named task ({', '.join(TASKS)}) nor an existing JSONL file"
        )
    return load_task_jsonl(path)


@torch.no_grad()
def clean_answer_logits(model: nn.Module, data: EncodedTask, batch_size: int = 64) -> Tensor:
    """Unsteered answer-position logits for every row, float32 on CPU, (n, V)."""
    out = [answer_logits(model, data.ids[i:i + batch_size], data.mask[i:i + batch_size]).cpu()
           for i in range(0, len(data), batch_size)]
    return torch.cat(out)
