"""Instruction and chat data: reading records, chat-template tokenisation, multi-task mixtures.

A record is either `{"prompt": ..., "response": ...}` (aliases: instruction/input/output/completion)
or `{"messages": [{"role": ..., "content": ...}, ...]}` whose last message is the assistant's, with an
optional `"task"`. Tokenisation applies the tokenizer's chat template and puts the loss on the
response tokens only; padding is masked by the collator (`transformers.DataCollatorForSeq2Seq`).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
PROMPT_KEYS = ("prompt", "instruction", "question")
RESPONSE_KEYS = ("response", "output", "completion", "answer")
KNOWN_KEYS = {*PROMPT_KEYS, *RESPONSE_KEYS, "input", "messages", "task", "system", "options", "label"}


class DataError(ValueError):
    """Bad data input; the message names the file/record and what is allowed."""


@dataclass(frozen=True)
class Example:
    messages: tuple[tuple[str, str], ...]  # (role, content); the last one is the assistant's response
    task: str = "default"

    @property
    def prompt_key(self) -> str:
        """What identifies an example for train/test deduplication: everything but the response."""
        return json.dumps(self.messages[:-1])

    @property
    def response(self) -> str:
        return self.messages[-1][1]


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records from a .jsonl, .json (a list) or .csv file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    try:
        return _read_records(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def _json_problem(err: Exception) -> str:
    """Why json.loads failed: its message, or the limit that was hit (nesting, digits of an integer)."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return err.msg if isinstance(err, json.JSONDecodeError) else str(err)


def _read_records(path: str) -> list[dict[str, Any]]:
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8-sig", newline="") as fh:  # -sig: a leading BOM is skipped
        if ext == ".jsonl":
            records = []
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except (ValueError, RecursionError) as err:  # ValueError: > 4300-digit integers
                        raise DataError(f"{path}:{i}: not valid JSON ({_json_problem(err)})") from None
        elif ext == ".json":
            try:
                records = json.load(fh)
            except UnicodeDecodeError:
                raise
            except (ValueError, RecursionError) as err:
                raise DataError(f"{path}: not valid JSON ({_json_problem(err)})") from None
            if not isinstance(records, list):
                raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        elif ext == ".csv":
            try:
                records = list(csv.DictReader(fh))
            except csv.Error as err:
                raise DataError(f"{path}: not valid CSV ({err})") from None
            for i, row in enumerate(records, 1):
                if None in row:  # DictReader's key for values beyond the header
                    raise DataError(f"{path} record {i}: more values than the header has columns")
        else:
            raise DataError(f"{path}: unknown data format {ext!r}; allowed .jsonl, .json, .csv")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def to_example(record: Any, where: str = "record", default_task: str = "default") -> Example:
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected an object with prompt/response or messages, got {type(record).__name__}"
        )
    if "conversations" in record:  # ShareGPT: {from: system/human/gpt, value}
        record = {**record, "messages": _sharegpt_messages(record.pop("conversations"), where)}
        record = {k: v for k, v in record.items() if k != "conversations"}
    unknown = sorted(set(record) - KNOWN_KEYS, key=str)
    if unknown:
        raise DataError(
            f"{where}: unknown fields {unknown}; allowed {sorted(KNOWN_KEYS | {'conversations'})}"
        )
    task = record.get("task") or default_task
    if not isinstance(task, str):
        raise DataError(f"{where}: task must be a string, got {task!r}")
    if "messages" in record:
        msgs = record["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(
                isinstance(m, dict) and {"role", "content"} <= set(m) and isinstance(m["role"], str)
                for m in msgs
            )
        ):
            raise DataError(
                f"{where}: messages must be a non-empty list of {{role, content}} objects, roles strings"
            )
        if msgs[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: the last message must be the assistant's, got role {msgs[-1]['role']!r}"
            )
        return Example(tuple((m["role"], str(m["content"])) for m in msgs), task)
    prompt = next((record[k] for k in PROMPT_KEYS if record.get(k) not in (None, "")), None)
    response = next((record[k] for k in RESPONSE_KEYS if record.get(k) not in (None, "")), None)
    if prompt is None or response is None:
        raise DataError(
            f"{where}: needs a prompt ({'/'.join(PROMPT_KEYS)}) and a response "
            f"({'/'.join(RESPONSE_KEYS)}), or messages"
        )
    if record.get("input"):
        prompt = f"{prompt}\n\n{record['input']}"
    system = [("system", str(record["system"]))] if record.get("system") else []
    return Example((*system, ("user", str(prompt)), ("assistant", str(response))), task)


SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


def _sharegpt_messages(turns: Any, where: str) -> list[dict[str, Any]]:
    ok = isinstance(turns, list) and all(isinstance(t, dict) and {"from", "value"} <= set(t) for t in turns)
    if not ok:
        raise DataError(f"{where}: conversations must be a list of {{from, value}} objects (ShareGPT)")
    bad = sorted({str(t["from"]) for t in turns} - set(SHAREGPT_ROLES))
    if bad:
        raise DataError(f"{where}: conversations: unknown speakers {bad}; allowed {sorted(SHAREGPT_ROLES)}")
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def load_examples(
    source: str | os.PathLike | Iterable[dict[str, Any]],
    default_task: str = "default",
    where: str | None = None,
) -> list[Example]:
    """Examples from a file path, a list of dicts or a `datasets.Dataset` (errors count records from 1)."""
    if isinstance(source, (str, os.PathLike)):
        where, records = os.fspath(source), read_records(source)
    else:
        where, records = where or "dataset", list(source)
        if not records:
            raise DataError(f"{where}: no records")
    return [to_example(r, f"{where} record {i}", default_task) for i, r in enumerate(records, 1)]


def deduplicate(train: Sequence[Example], test: Sequence[Example]) -> list[Example]:
    """Train examples whose prompt also appears in the test set are dropped (and train duplicates)."""
    held_out = {ex.prompt_key for ex in test}
    seen: set[str] = set()
    kept = []
    for ex in train:
        if ex.prompt_key not in held_out and ex.prompt_key not in seen:
            seen.add(ex.prompt_key)
            kept.append(ex)
    return kept


def mix(
    by_task: dict[str, Sequence[Example]], weights: dict[str, float] | None, total: int, seed: int = 0
) -> list[Example]:
    """A multi-task mixture of `total` examples drawn with per-task sampling weights.

    Each task contributes round(total * w_task / sum w) examples, cycling through a shuffled copy of
    its examples (so a small task is repeated rather than dropped); the result is shuffled.
    """
    weights = weights or {task: 1.0 for task in by_task}
    unknown = sorted(set(weights) - set(by_task))
    if unknown:
        raise DataError(f"mixture weights name unknown tasks {unknown}; tasks are {sorted(by_task)}")
    rng = random.Random(seed)
    norm = sum(weights.values())
    out: list[Example] = []
    for task, w in weights.items():
        pool = list(by_task[task])
        if not pool:
            raise DataError(f"task {task!r} has no examples")
        rng.shuffle(pool)
        n = round(total * w / norm)
        out += [pool[i % len(pool)] for i in range(n)]
    rng.shuffle(out)
    return out


def prompt_text(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> str:
    """The prompt as the model sees it, ending where the assistant's answer starts."""
    chat = [{"role": r, "content": c} for r, c in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return "".join(f"{c}\n" for _, c in chat) + "Answer: "


def encode(tokenizer: Any, example: Example, max_length: int = 512) -> dict[str, list[int]]:
    """input_ids / attention_mask / labels with the loss on the response (and its end token) only."""
    prompt = prompt_text(tokenizer, example.messages[:-1])
    end = end_of_turn(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example.response + end, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[-max_length:]  # keep the answer if the prompt is too long
    n_prompt = max(0, len(ids) - len(response_ids))
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def end_of_turn(tokenizer: Any) -> str:
    """The text that closes an assistant turn in the chat template (e.g. `<|im_end|>`), else EOS."""
    if getattr(tokenizer, "chat_template", None):
        probe = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "XYZ"}], tokenize=False
        )
        tail = probe.split("XYZ", 1)[1]
        return tail.rstrip("\n") or (tokenizer.eos_token or "")
    return tokenizer.eos_token or ""
