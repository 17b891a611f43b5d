"""Accuracy of a causal LM on labelled prompts: option scoring, exact match, confidence intervals.

Classification items are scored by the log-likelihood of each option's tokens after the chat-formatted
prompt (the option with the highest total log-probability wins); free-form items (arithmetic) by exact
match of a greedy answer. Intervals are Wilson score intervals at 95%.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moetune.data import Example, end_of_turn, prompt_text


@dataclass
class EvalItem:
    example: Example  # prompt messages + the gold response
    options: tuple[str, ...] = ()  # empty: exact match of a generated answer


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def option_logprobs(model: nn.Module, tokenizer, prompt: str, options: Sequence[str]) -> list[float]:
    """Total log-probability of each option's tokens after `prompt` (one batch of len(options) rows)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    rows = [prompt_ids + tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    scores = []
    for i, row in enumerate(rows):
        positions = range(len(prompt_ids), len(row))  # option tokens, predicted from the position before
        scores.append(sum(float(logp[i, t - 1, row[t]]) for t in positions))
    return scores


@torch.no_grad()
def greedy_answer(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def normalise_answer(text: str) -> str:
    return text.strip().split("\n")[0].strip().rstrip(".").strip()


def evaluate(
    model: nn.Module, tokenizer, items: Sequence[EvalItem], progress: Callable[[int], None] | None = None
) -> dict[str, float]:
    """Accuracy with its 95% interval over `items`."""
    was_training = model.training
    model.eval()
    correct = 0
    end = end_of_turn(tokenizer)  # options are scored with the turn's end, so "sport" != "sports..."
    for i, item in enumerate(items):
        prompt = prompt_text(tokenizer, item.example.messages[:-1])
        gold = item.example.response
        if item.options:
            scores = option_logprobs(model, tokenizer, prompt, [o + end for o in item.options])
            correct += item.options[max(range(len(scores)), key=scores.__getitem__)] == gold
        else:
            correct += normalise_answer(greedy_answer(model, tokenizer, prompt)) == normalise_answer(gold)
        if progress:
            progress(i + 1)
    model.train(was_training)
    n = len(items)
    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else float("nan"), "ci95_low": low, "ci95_high": high, "n": n}
