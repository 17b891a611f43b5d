"""GPU speed check: moetune vs peft LoRA on the random-weight Llama models of speed.py, on one CUDA device.

Each configuration gets a fresh model (base in `--dtype`, adapters as each library keeps them over it:
float32 master weights, or moetune's `--adapter-dtype`); timed with CUDA events after warm-up steps:
  train  forward + backward + AdamW step (torch.autocast in `--dtype`, as the Trainer's bf16=True)
  infer  eval forward under no_grad
Peak memory is torch.cuda.max_memory_allocated during the training steps. The table gives each
configuration's median and its ratio to peft LoRA r=16 (speed.py's baseline: the same active rank).

    python benchmarks/gpu_speed.py                                   # small + ffn-heavy, 3 configs
    python benchmarks/gpu_speed.py --models ffn-heavy --batch 8 --seq 2048 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outputs import write_text  # noqa: E402
from speed import ATTN, BASELINE, CONFIGS, MLP, MODELS, moe_config  # noqa: E402

DEFAULT_CONFIGS = "peft-lora-r16,moetune-ffn-e8,moetune-ffn-e64"
# speed.py's configurations and, on the GPU, each ffn dispatch forced at E=8 and E=64 (MoEFFN.slot_path)
GPU_CONFIGS = CONFIGS | {
    f"moetune-{d}-e{e}": ("moetune", dict(expert_type="ffn", num_experts=e, dispatch=d))
    for d in ("dense", "grouped", "sorted")
    for e in (8, 64)
}


def build(
    model_name: str, config_name: str, dtype: torch.dtype, adapter_dtype: str = "auto"
) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**MODELS[model_name], max_position_embeddings=4096, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).to(dtype)
    kind, opts = GPU_CONFIGS[config_name]
    torch.manual_seed(1)
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=opts["r"], lora_alpha=2 * opts["r"], lora_dropout=0.0, target_modules=ATTN + MLP)
        return get_peft_model(base, lcfg).cuda()
    if kind != "moetune":
        raise ValueError(f"{config_name}: only peft and moetune configurations run on the GPU")
    import moetune

    model = moetune.get_moe_model(base, moe_config(opts, 0.0, adapter_dtype=adapter_dtype)).cuda()
    model._ctx.options.dispatch = opts.get("dispatch", "auto")
    model._ctx.options.reference = bool(opts.get("reference"))
    return model


def time_config(model_name: str, config_name: str, args: argparse.Namespace) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    model = build(model_name, config_name, dtype, args.adapter_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, MODELS[model_name]["vocab_size"], (args.batch, args.seq), generator=g).cuda()
    mask = torch.ones_like(ids)

    def train() -> None:
        with torch.autocast("cuda", dtype=dtype):
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            model(input_ids=ids, attention_mask=mask)

    result: dict[str, Any] = {"trainable": sum(p.numel() for p in params)}
    for phase, step in (("train", train), ("infer", infer)):
        model.train(phase == "train")
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        q1, median, q3 = statistics.quantiles(times, n=4)
        result[phase], result[f"{phase}_iqr"] = median, (q1, q3)
        if phase == "train":
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result  # the model and optimizer go with this frame


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="small,ffn-heavy", help=f"comma list of {list(MODELS)}")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma list of {list(GPU_CONFIGS)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument(
        "--adapter-dtype",
        default="auto",
        help="moetune's MoEConfig.adapter_dtype (auto: float32 over a bf16 base; bfloat16: the grouped "
        "GEMM's bf16 kernel)",
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_speed.py needs a CUDA device (benchmarks/speed.py is the CPU benchmark)")
    configs = args.configs.split(",")
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, {args.dtype}, batch {args.batch}x{args.seq}")
    results: dict[str, dict[str, Any]] = {}
    for model_name in args.models.split(","):
        print(f"\n| {model_name} | train ms (IQR) | ×LoRA | infer ms (IQR) | ×LoRA | peak GiB | trainable |")
        print("|---|---|---|---|---|---|---|")
        rows = results[model_name] = {}
        for c in configs:  # each row as it comes (and the JSON after it): a run cut short keeps them
            r = rows[c] = time_config(model_name, c, args)
            torch.cuda.empty_cache()
            base = rows.get(BASELINE)
            cells = []
            for p in ("train", "infer"):
                q1, q3 = r[f"{p}_iqr"]
                cells += [f"{r[p]:.2f} ({q1:.2f}-{q3:.2f})", f"{r[p] / base[p]:.2f}" if base else "-"]
            print(
                f"| {c} | {' | '.join(cells)} | {r['peak_gib']:.2f} | {r['trainable'] / 1e6:.1f} M |",
                flush=True,
            )
            if args.out:
                write_text(
                    args.out, json.dumps({"device": device, "args": vars(args), "results": results}, indent=1)
                )


if __name__ == "__main__":
    main()
