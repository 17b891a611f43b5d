"""Memory benchmark: peak memory and step time of a training step, moetune vs peft LoRA, CPU.

Same active rank on both sides (peft LoRA r=16 on attention + MLP; moetune E=8 top-2 r=8 `ffn` experts
+ attention LoRA r=8), on the speed benchmark's random-weight Llama models, each configuration in its
own process, with and without activation checkpointing (non-reentrant) and with the frozen base in
fp32 or torchao int8 weight-only (QLoRA-style: the decoder's linears quantized, lm_head kept).
Memory = the process's peak RSS during the timed training steps (VmHWM, reset before them) and its rise
above the RSS just before: weights, optimizer state and the step's activations.

    python benchmarks/memory.py --out memory.json --markdown memory.md      # ~5 min on 2 cores
    python benchmarks/memory.py --steps 1 --batch 2 --seq 64                 # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from outputs import write_outputs  # noqa: E402
from speed import ATTN, CONFIGS, MLP, MODELS, _malloc_trim, _proc_status, _reset_hwm, moe_config  # noqa: E402

ADAPTERS = ("peft-lora-r16", "moetune-e8")
BASES = ("fp32", "int8")


def build(model_name: str, adapter: str, base_kind: str, checkpointing: bool, dropout: float):
    """(model, trainable parameters) of one configuration."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**MODELS[model_name], max_position_embeddings=2048, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).float()
    if base_kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        def decoder_linear(module: torch.nn.Module, fqn: str) -> bool:
            return isinstance(module, torch.nn.Linear) and "lm_head" not in fqn

        quantize_(base, Int8WeightOnlyConfig(), filter_fn=decoder_linear)
    torch.manual_seed(1)
    if adapter == "peft-lora-r16":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=ATTN + MLP)
        model = get_peft_model(base, lora)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    else:
        import moetune

        model = moetune.get_moe_model(base, moe_config(CONFIGS["moetune-ffn-e8"][1], dropout))
        if checkpointing:
            model.gradient_checkpointing_enable()
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    adapter, base_kind, ckpt = args.worker.split(":")
    model, params = build(args.model, adapter, base_kind, ckpt == "ckpt", args.dropout)
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, MODELS[args.model]["vocab_size"], (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)

    def step() -> None:
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state exists from here on
    times, peaks, rises = [], [], []
    for _ in range(args.steps):
        gc.collect()
        _malloc_trim()
        before = _proc_status("VmRSS")
        _reset_hwm()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        peak = _proc_status("VmHWM")
        peaks.append(peak)
        rises.append(peak - before)
    return {
        "step_s": statistics.median(times),
        "step_s_all": times,
        "peak_rss_mb": max(peaks) / 1024,
        "rise_mb": max(rises) / 1024,
        "trainable": sum(p.numel() for p in params),
    }


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for base_kind in BASES:
        for ckpt in ("plain", "ckpt"):
            for adapter in ADAPTERS:
                name = f"{adapter}:{base_kind}:{ckpt}"
                command = [sys.executable, os.path.abspath(__file__), "--worker", name]
                for flag in ("model", "batch", "seq", "steps", "threads", "dropout"):
                    command += [f"--{flag}", str(getattr(args, flag))]
                proc = subprocess.run(command, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
                results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
                r = results[name]
                print(
                    f"{name:<32} step {r['step_s']:.2f} s  peak {r['peak_rss_mb']:.0f} MB  "
                    f"rise {r['rise_mb']:.0f} MB"
                )
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| base | checkpointing | peft LoRA r=16: step s / peak MB (rise) "
        "| moetune E=8: step s / peak MB (rise) | moetune / peft: step, peak, rise |",
        "|---|---|---|---|---|",
    ]
    for base_kind in BASES:
        for ckpt in ("plain", "ckpt"):
            p, m = (results[f"{a}:{base_kind}:{ckpt}"] for a in ADAPTERS)
            lines.append(
                f"| {base_kind} | {'yes' if ckpt == 'ckpt' else 'no'} "
                f"| {p['step_s']:.2f} / {p['peak_rss_mb']:.0f} ({p['rise_mb']:.0f}) "
                f"| {m['step_s']:.2f} / {m['peak_rss_mb']:.0f} ({m['rise_mb']:.0f}) "
                f"| {m['step_s'] / p['step_s']:.2f}, {m['peak_rss_mb'] / p['peak_rss_mb']:.2f}, "
                f"{m['rise_mb'] / p['rise_mb']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed training steps after one warm-up step")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    results = run_all(args)
    table = markdown(results)
    print(table)
    meta = {k: getattr(args, k) for k in ("model", "batch", "seq", "steps", "threads", "dropout")}
    meta |= {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    write_outputs(args.out, {"settings": meta, "results": results}, args.markdown, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
