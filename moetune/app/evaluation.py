"""Accuracy of a causal LM on labelled prompts: option scoring, exact match, confidence intervals.

Classification items are scored by the log-likelihood of each option's tokens after the chat-formatted
prompt (the option with the highest total log-probability wins); free-form items (arithmetic) by exact
match of a greedy answer, either decoded (`exact_match="generate"`: up to 8 new tokens, the first line
compared without a final period) or checked in one forward pass (`exact_match="teacher_forced"`: the
answer's tokens, as training encodes them, and the end of the turn must each be the model's argmax after
the prompt and the answer's tokens before them: what greedy decoding would emit, with no length cap and
no normalisation). Intervals are Wilson score intervals at 95%.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moetune.app.data import Example, end_of_turn, prompt_text

EXACT_MATCH = ("generate", "teacher_forced")


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
def option_logprobs_batch(
    model: nn.Module, tokenizer, prompts: Sequence[str], options: Sequence[str]
) -> list[list[float]]:
    """Total log-probability of each option's tokens after each prompt: (len(prompts), len(options)).

    The prompts run once, left-padded in one batch (position ids from the mask); their KV cache is
    repeated for the options, which run as one more small batch.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompt_rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    B, L = len(prompt_rows), max(map(len, prompt_rows))
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in prompt_rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in prompt_rows])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first_logp = out.logits[:, -1].float().log_softmax(-1)  # (B, V) after each prompt
    option_rows = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    scores = [[float(first_logp[b, r[0]]) for r in option_rows] for b in range(B)]
    K, W = len(option_rows), max(map(len, option_rows))
    if W > 1:  # the options' later tokens, K rows per prompt
        opt_ids = torch.tensor([r + [pad] * (W - len(r)) for r in option_rows]).repeat(B, 1)  # (B*K, W)
        opt_mask = torch.tensor([[1] * len(r) + [0] * (W - len(r)) for r in option_rows]).repeat(B, 1)
        cache_name = _cache_argument(model)
        cache = getattr(out, cache_name)
        cache.batch_repeat_interleave(K)
        full_mask = torch.cat([mask.repeat_interleave(K, 0), opt_mask], 1)
        opt_pos = mask.sum(-1).repeat_interleave(K)[:, None] + torch.arange(W)
        logp = (
            model(input_ids=opt_ids, attention_mask=full_mask, position_ids=opt_pos, **{cache_name: cache})
            .logits.float()
            .log_softmax(-1)
        )  # (B*K, W, V)
        for b in range(B):
            for k, r in enumerate(option_rows):
                scores[b][k] += sum(float(logp[b * K + k, t - 1, r[t]]) for t in range(1, len(r)))
    return scores


def _cache_argument(model: nn.Module) -> str:
    """The KV cache's name in forward and outputs: `cache` (transformers >= 5.x) or `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def option_logprobs(model: nn.Module, tokenizer, prompt: str, options: Sequence[str]) -> list[float]:
    """Total log-probability of each option's tokens after `prompt`."""
    return option_logprobs_batch(model, tokenizer, [prompt], options)[0]


@torch.no_grad()
def greedy_answers(
    model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8, batch_size: int = 16
) -> list[str]:
    """Greedy continuations, batched with left padding (KV cache)."""
    answers = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                list(prompts[start : start + batch_size]),
                add_special_tokens=False,
                padding=True,
                return_tensors="pt",
            )
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def greedy_answer(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    return greedy_answers(model, tokenizer, [prompt], max_new_tokens)[0]


@torch.no_grad()
def greedy_matches(model: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> list[bool]:
    """Whether greedy decoding after each prompt gives exactly its answer, end of turn included.

    One left-padded forward per batch: answer token j is matched against the argmax of the logits at
    the position before it, given the prompt and answer tokens 0..j-1 (teacher forcing); all must match.
    The answer is tokenised with the end of turn as `moetune.app.data.encode` does for training.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    end = end_of_turn(tokenizer)
    rows, answer_lengths = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        answer_ids = tokenizer(answer + end, add_special_tokens=False)["input_ids"]
        rows.append(tokenizer(prompt, add_special_tokens=False)["input_ids"] + answer_ids)
        answer_lengths.append(len(answer_ids))
    L, W = max(map(len, rows)), max(answer_lengths)
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])  # (B, L): every row ends at L
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    # the logits at positions L-W-1 .. L-2 predict the last W tokens
    logits_BWV = model(
        input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], logits_to_keep=W
    ).logits
    predicted_BW = logits_BWV.argmax(-1)
    return [bool((predicted_BW[b, W - n :] == ids[b, L - n :]).all()) for b, n in enumerate(answer_lengths)]


def normalise_answer(text: str) -> str:
    return text.strip().split("\n")[0].strip().rstrip(".").strip()


def score_items(
    model: nn.Module,
    tokenizer,
    items: Sequence[EvalItem],
    progress: Callable[[int], None] | None = None,
    batch_size: int = 8,
    exact_match: str = "generate",
) -> list[bool]:
    """Whether the model answers each item correctly, in the items' order (see the module docstring)."""
    if exact_match not in EXACT_MATCH:
        raise ValueError(f"exact_match={exact_match!r}: allowed {', '.join(map(repr, EXACT_MATCH))}")
    was_training = model.training
    model.eval()
    correct = [False] * len(items)
    end = end_of_turn(tokenizer)  # options are scored with the turn's end, so "sport" != "sports..."
    free_form, by_options = [], {}
    for i, item in enumerate(items):
        prompt = prompt_text(tokenizer, item.example.messages[:-1])
        if item.options:
            by_options.setdefault(item.options, []).append((i, prompt))
        else:
            free_form.append((i, prompt))
    for options, indexed in by_options.items():
        indexed.sort(key=lambda pair: len(pair[1]))  # similar lengths share a batch: little padding
        for start in range(0, len(indexed), batch_size):
            chunk = indexed[start : start + batch_size]
            scores = option_logprobs_batch(
                model, tokenizer, [p for _, p in chunk], [o + end for o in options]
            )
            for row, (i, _) in zip(scores, chunk, strict=True):
                correct[i] = options[max(range(len(row)), key=row.__getitem__)] == items[i].example.response
            if progress:
                progress(len(chunk))
    if free_form and exact_match == "generate":
        answers = greedy_answers(model, tokenizer, [p for _, p in free_form])
        for (i, _), answer in zip(free_form, answers, strict=True):
            correct[i] = normalise_answer(answer) == normalise_answer(items[i].example.response)
        if progress:
            progress(len(free_form))
    elif free_form:
        free_form.sort(key=lambda pair: len(pair[1]))
        for start in range(0, len(free_form), batch_size):
            chunk = free_form[start : start + batch_size]
            golds = [items[i].example.response for i, _ in chunk]
            matches = greedy_matches(model, tokenizer, [p for _, p in chunk], golds)
            for (i, _), ok in zip(chunk, matches, strict=True):
                correct[i] = ok
            if progress:
                progress(len(chunk))
    model.train(was_training)
    return correct


def summarise(correct: Sequence[bool]) -> dict[str, float]:
    """Accuracy with its 95% Wilson interval and the number of items."""
    n, hits = len(correct), sum(correct)
    low, high = wilson_interval(hits, n)
    return {"accuracy": hits / n if n else float("nan"), "ci95_low": low, "ci95_high": high, "n": n}


def evaluate(
    model: nn.Module,
    tokenizer,
    items: Sequence[EvalItem],
    progress: Callable[[int], None] | None = None,
    batch_size: int = 8,
    exact_match: str = "generate",
) -> dict[str, float]:
    """Accuracy with its 95% interval over `items`."""
    return summarise(score_items(model, tokenizer, items, progress, batch_size, exact_match))
