"""GPU speed check: moetune vs peft LoRA on random-weight Llama models, on one CUDA device.

Each configuration gets a fresh model (base in `--dtype`, adapters as each library keeps them over it:
float32 master weights, or moetune's `--adapter-dtype`); timed with CUDA events after warm-up steps:
  train     forward + backward + AdamW step (torch.autocast in `--dtype`, as the Trainer's bf16=True)
  infer     eval forward under no_grad
  generate  (--generate B,...) greedy decoding with the KV cache, `--new-tokens` tokens from a
            `--prompt`-token prompt, per batch size B: tokens per second
Peak memory is torch.cuda.max_memory_allocated during the training steps; `--launches` counts the CUDA
kernels one training step launches (torch.profiler). The table gives each configuration's median and
its ratio to peft LoRA r=16 (the same active rank as top-2 r=8). Models: speed.py's two and four
decoder layers of Llama-3-8B and Llama-3.2-1B, each at its own batch (`SHAPES`; --batch/--seq override).

    python benchmarks/gpu_speed.py                                   # small + ffn-heavy, 3 configs
    python benchmarks/gpu_speed.py --models llama3-8b-4l,llama3.2-1b-4l --launches --generate 1,16
    python benchmarks/gpu_speed.py --models llama3.2-1b-4l --configs peft-lora-r16,moetune-ffn-e8,mixlora-e8
    python benchmarks/gpu_speed.py --device cpu --models small --batch 1 --seq 16 --repeats 1  # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outputs import write_text  # noqa: E402
from speed import ATTN, BASELINE, CONFIGS, MLP, MODELS, _build_mixlora, moe_config  # noqa: E402

DEFAULT_CONFIGS = "peft-lora-r16,moetune-ffn-e8,moetune-ffn-e64"
# the model shapes people fine-tune: four decoder layers of each (random weights, vocabulary 32000)
GPU_MODELS = MODELS | {
    "llama3-8b-4l": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=4,
        vocab_size=32000,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "llama3.2-1b-4l": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=4,
        vocab_size=32000,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
}
SHAPES = {"llama3-8b-4l": (4, 2048), "llama3.2-1b-4l": (8, 2048)}  # (batch, seq); others 8 x 1024
MIXLORA_DROPOUT = 0.05  # the mixlora package asserts lora_dropout > 0; the others run without dropout
# speed.py's configurations and, on the GPU, each ffn dispatch forced at E=8 and E=64 (MoEFFN.slot_path)
GPU_CONFIGS = CONFIGS | {
    f"moetune-{d}-e{e}": ("moetune", dict(expert_type="ffn", num_experts=e, dispatch=d))
    for d in ("dense", "grouped", "sorted")
    for e in (8, 64)
}


class Built:
    """A model under test, its trainable parameters, and the modules `.train()` must reach besides it."""

    def __init__(
        self, model: torch.nn.Module, params: list | None = None, hidden: list | None = None
    ) -> None:
        self.model = model
        self.params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.hidden = hidden or []

    def train(self, mode: bool) -> None:
        self.model.train(mode)
        for m in self.hidden:
            m.train(mode)


def build(
    model_name: str, config_name: str, dtype: torch.dtype, adapter_dtype: str = "auto", device: str = "cuda"
) -> Built:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**GPU_MODELS[model_name], max_position_embeddings=4096, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).to(dtype)
    kind, opts = GPU_CONFIGS[config_name]
    torch.manual_seed(1)
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=opts["r"], lora_alpha=2 * opts["r"], lora_dropout=0.0, target_modules=ATTN + MLP)
        return Built(get_peft_model(base, lcfg).to(device))
    if kind == "mixlora":  # float32 experts over the base, as speed.py; mixlora needs lora_dropout > 0
        model, params, experts = _build_mixlora(base.to(device), opts["num_experts"], MIXLORA_DROPOUT)
        return Built(model, params, experts)  # its experts live in dicts: .train() misses them
    import moetune

    model = moetune.get_moe_model(base, moe_config(opts, 0.0, adapter_dtype=adapter_dtype)).to(device)
    model._ctx.options.dispatch = opts.get("dispatch", "auto")
    model._ctx.options.reference = bool(opts.get("reference"))
    return Built(model)


class Clock:
    """Milliseconds of a callable: CUDA events on the GPU, perf_counter elsewhere (the smoke test)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, step: Callable[[], None]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            step()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)


def median_iqr(times: list[float]) -> tuple[float, tuple[float, float]]:
    if len(times) == 1:
        return times[0], (times[0], times[0])
    q1, median, q3 = statistics.quantiles(times, n=4)
    return median, (q1, q3)


def kernel_launches(step: Callable[[], None], device: str) -> int:
    """Kernels one call of `step` launches on the GPU (aten ops on the CPU), by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    if device == "cuda":
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def time_config(model_name: str, config_name: str, args: argparse.Namespace) -> dict[str, Any]:
    dtype, device, clock = getattr(torch, args.dtype), args.device, Clock(args.device)
    batch, seq = shape_of(model_name, args)
    built = build(model_name, config_name, dtype, args.adapter_dtype, device)
    model, params = built.model, built.params
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(2)
    vocab = GPU_MODELS[model_name]["vocab_size"]
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    mask = torch.ones_like(ids)

    def train() -> None:
        with torch.autocast(device, dtype=dtype):
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer() -> None:
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            model(input_ids=ids, attention_mask=mask)

    result: dict[str, Any] = {"trainable": sum(p.numel() for p in params), "batch": batch, "seq": seq}
    for phase, step in (("train", train), ("infer", infer)):
        built.train(phase == "train")
        for _ in range(args.warmup):
            step()
        clock.sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = [clock.time(step) for _ in range(args.repeats)]
        result[phase], result[f"{phase}_iqr"] = median_iqr(times)
        if phase == "train":
            result["peak_gib"] = (
                torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            )
            if args.launches:
                result["launches"] = kernel_launches(step, device)
    built.train(False)
    for gen_batch in args.generate if GPU_CONFIGS[config_name][0] != "mixlora" else ():
        prompt = torch.randint(0, vocab, (gen_batch, args.prompt), generator=g).to(device)

        def generate(prompt: torch.Tensor = prompt) -> None:
            with torch.no_grad(), torch.autocast(device, dtype=dtype):
                out = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,  # random weights: no early end of sequence
                    do_sample=False,
                    pad_token_id=0,
                )
            assert out.shape[1] == args.prompt + args.new_tokens

        generate()  # warm-up
        ms = statistics.median(clock.time(generate) for _ in range(max(1, args.repeats // 3)))
        result[f"generate_b{gen_batch}_tok_s"] = gen_batch * args.new_tokens / (ms / 1e3)
    return result  # the model and optimizer go with this frame


def shape_of(model_name: str, args: argparse.Namespace) -> tuple[int, int]:
    batch, seq = SHAPES.get(model_name, (8, 1024))
    return args.batch or batch, args.seq or seq


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="small,ffn-heavy", help=f"comma list of {list(GPU_MODELS)}")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma list of {list(GPU_CONFIGS)}")
    ap.add_argument("--batch", type=int, default=None, help="sequences per batch (default: SHAPES, else 8)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: SHAPES, else 1024)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument(
        "--adapter-dtype",
        default="auto",
        help="moetune's MoEConfig.adapter_dtype (auto: float32 over a bf16 base; bfloat16: the grouped "
        "GEMM's bf16 kernel)",
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--launches", action="store_true", help="count the kernels of one training step")
    ap.add_argument(
        "--generate", default="", help="comma list of batch sizes to time greedy generation at (e.g. 1,16)"
    )
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated (default 128)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens for generation (default 128)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test only")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    args.generate = [int(b) for b in args.generate.split(",") if b]
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_speed.py needs a CUDA device (benchmarks/speed.py is the CPU benchmark)")
    configs = args.configs.split(",")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke test)"
    print(f"{device}, torch {torch.__version__}, {args.dtype}")
    results: dict[str, dict[str, Any]] = {}
    for model_name in args.models.split(","):
        batch, seq = shape_of(model_name, args)
        gen_cols = [f"gen b={b} tok/s | ×LoRA" for b in args.generate]
        head = ["train ms (IQR)", "×LoRA", "infer ms (IQR)", "×LoRA", "peak GiB", "trainable"]
        head += ["launches | ×LoRA"] if args.launches else []
        print(f"\n| {model_name} {batch}x{seq} | {' | '.join(head + gen_cols)} |")
        print("|---" * (1 + len(head) + (1 if args.launches else 0) + 2 * len(gen_cols)) + "|")
        rows = results[model_name] = {}
        for c in configs:  # each row as it comes (and the JSON after it): a run cut short keeps them
            r = rows[c] = time_config(model_name, c, args)
            if args.device == "cuda":
                torch.cuda.empty_cache()
            print(row(c, r, rows.get(BASELINE), args), flush=True)
            if args.out:
                write_text(
                    args.out, json.dumps({"device": device, "args": vars(args), "results": results}, indent=1)
                )
        if "moetune-ffn-e8" in rows and "mixlora-e8" in rows:
            ours, theirs = rows["moetune-ffn-e8"]["train"], rows["mixlora-e8"]["train"]
            print(
                f"\n{model_name}: moetune E=8 training step / the mixlora package's E=8: {ours / theirs:.2f}"
            )
    return results


def row(name: str, r: dict[str, Any], base: dict[str, Any] | None, args: argparse.Namespace) -> str:
    """One Markdown table row: medians with their IQR, and ratios to the baseline where it ran first."""

    def ratio(key: str) -> str:
        return f"{r[key] / base[key]:.2f}" if base and base.get(key) else "-"

    cells = []
    for p in ("train", "infer"):
        q1, q3 = r[f"{p}_iqr"]
        cells += [f"{r[p]:.2f} ({q1:.2f}-{q3:.2f})", ratio(p)]
    cells += [f"{r['peak_gib']:.2f}", f"{r['trainable'] / 1e6:.1f} M"]
    if args.launches:
        cells += [str(r["launches"]), ratio("launches")]
    for b in args.generate:
        key = f"generate_b{b}_tok_s"
        cells += [f"{r[key]:.0f}", ratio(key)] if key in r else ["-", "-"]  # mixlora: not timed
    return f"| {name} | {' | '.join(cells)} |"


if __name__ == "__main__":
    main()
