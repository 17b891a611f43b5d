"""Ops and bytes of one training step, moetune against peft LoRA: counts that a busy machine cannot blur.

Every aten op of one forward + backward (a `TorchDispatchMode` sees them all, autocast's casts
included) is counted with the bytes of the tensors it returns; views (which write nothing) are
counted but their bytes are not. Random-weight Llama layers built from a config, the same batch for
both configurations; peft LoRA on the MLP projections moetune's `ffn` experts adapt.

    python benchmarks/op_count.py                                  # SmolLM2-135M shapes, 2 layers, bf16
    python benchmarks/op_count.py --dtype float32 --layers 4 --moe expert_type=linear
    python benchmarks/op_count.py --out counts.md

The numbers are per step and deterministic for a given torch build; times are for benchmarks/speed.py.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VIEWS = {
    "view",
    "_unsafe_view",
    "expand",
    "unsqueeze",
    "squeeze",
    "transpose",
    "t",
    "permute",
    "select",
    "slice",
    "as_strided",
    "alias",
    "detach",
    "split",
    "split_with_sizes",
    "unbind",
    "chunk",
    "narrow",
    "diagonal",
    "_reshape_alias",
}


class Counts(TorchDispatchMode):
    """op -> number of calls; (op, dtype) -> bytes returned (views excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()
        self.bytes: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.calls[name] += 1
        if name not in VIEWS:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.bytes[name, str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
        return out


def base_model(layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(  # SmolLM2-135M-Instruct's shapes
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def build(kind: str, layers: int, moe: dict) -> torch.nn.Module:
    base = base_model(layers)
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["gate_proj", "up_proj", "down_proj"]
        )
        return get_peft_model(base, lora)
    import moetune

    return moetune.get_moe_model(base, moetune.MoEConfig(**moe))


def step(model: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> None:
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with autocast:
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()


def count(kind: str, args: argparse.Namespace, moe: dict) -> Counts:
    model = build(kind, args.layers, moe).train()
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    step(model, ids, args.dtype)  # warm-up: lazy initialisation stays out of the counts
    model.zero_grad(set_to_none=True)
    with Counts() as counts:
        step(model, ids, args.dtype)
    return counts


def table(peft: Counts, moe: Counts, top: int) -> list[str]:
    mb = 1e6
    total_peft, total_moe = sum(peft.bytes.values()) / mb, sum(moe.bytes.values()) / mb
    lines = [
        "| | peft LoRA r=16 | moetune | moetune - peft |",
        "|---|---|---|---|",
        f"| ops | {sum(peft.calls.values())} | {sum(moe.calls.values())} | "
        f"{sum(moe.calls.values()) - sum(peft.calls.values())} |",
        f"| MB returned (views excluded) | {total_peft:.1f} | {total_moe:.1f} "
        f"| {total_moe - total_peft:.1f} |",
        "",
        f"The {top} (op, dtype) with the most extra bytes, and the {top} ops with the most extra calls:",
        "",
        "| op | dtype | extra MB | moetune MB | peft MB |",
        "|---|---|---|---|---|",
    ]
    extra = collections.Counter(moe.bytes)
    extra.subtract(peft.bytes)
    for (op, dtype), value in extra.most_common(top):
        ours, theirs = moe.bytes[op, dtype] / mb, peft.bytes[op, dtype] / mb
        lines.append(f"| {op} | {dtype} | {value / mb:.1f} | {ours:.1f} | {theirs:.1f} |")
    lines += ["", "| op | extra calls | moetune | peft |", "|---|---|---|---|"]
    calls = collections.Counter(moe.calls)
    calls.subtract(peft.calls)
    for op, value in calls.most_common(top):
        lines.append(f"| {op} | {value} | {moe.calls[op]} | {peft.calls[op]} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    ap.add_argument("--batch", type=int, default=8, help="sequences (default 8)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="autocast dtype")
    ap.add_argument("--moe", action="append", default=[], help="a MoEConfig field as key=value (repeatable)")
    ap.add_argument("--top", type=int, default=12, help="rows per table")
    ap.add_argument("--out", default=None, help="also write the Markdown here")
    args = ap.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    moe = dict(num_experts=8, top_k=2, r=8, lora_alpha=16, lora_dropout=0.05)
    for item in args.moe:
        key, _, value = item.partition("=")
        moe[key] = int(value) if value.lstrip("-").isdigit() else value
    peft, ours = count("peft", args, {}), count("moe", args, moe)
    head = (
        f"One training step, {args.layers} Llama layers of SmolLM2-135M's shapes, batch "
        f"{args.batch}x{args.seq}, {str(args.dtype).removeprefix('torch.')}; moetune {moe}; "
        f"torch {torch.__version__}."
    )
    text = "\n".join([head, "", *table(peft, ours, args.top)]) + "\n"
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # counts do not depend on threads; one keeps a shared machine usable
    raise SystemExit(main())
