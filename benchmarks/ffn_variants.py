"""Time the library's `MoEFFN` paths against each other and peft LoRA r=16 on one MLP block (fwd+bwd).

Each path is first checked against the per-expert reference path (outputs and all gradients, dropout
off), then timed interleaved with the others and with peft LoRA r=16 on the same MLP:

  dense    dense in rank space (`DenseSlots`)
  grouped  slots sorted by expert once + torch._grouped_mm (`GroupedSlots`)
  auto     what the layer picks by itself (grouped once E r (1/d_in + 1/d_out) > 0.5)

The layers come from benchmarks/speed.py's `Bench`. Before the two paths went into the library this
script held prototypes of them ("v2", "v3" in results/ffn-variants-*.md).

    python benchmarks/ffn_variants.py --model small --experts 8,64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from speed import Bench  # noqa: E402

PROJ = ("gate_proj", "up_proj", "down_proj")


def _with(layer, x: torch.Tensor, *, dispatch: str = "auto", reference: bool = False) -> torch.Tensor:
    """The layer's forward with one path forced (the routing context is restored afterwards)."""
    ctx = layer.ctx
    before = ctx.options.dispatch, ctx.options.reference
    ctx.options.dispatch, ctx.options.reference = dispatch, reference
    try:
        return layer(x)
    finally:
        ctx.options.dispatch, ctx.options.reference = before


VARIANTS = {
    "reference": lambda layer, x: _with(layer, x, reference=True),
    "dense": lambda layer, x: _with(layer, x, dispatch="dense"),
    "grouped": lambda layer, x: _with(layer, x, dispatch="grouped"),
    "auto": lambda layer, x: _with(layer, x),
}


def check(layer, hidden: int) -> dict[str, float]:
    """Max relative error of each path's output and gradients (input, experts, router) vs the reference."""
    g = torch.Generator().manual_seed(0)
    saved = [(b.lora_B[0].detach().clone()) for b in (layer.experts[p] for p in PROJ)]
    with torch.no_grad():
        for p in PROJ:
            layer.experts[p].lora_B[0].normal_(0, 0.02, generator=g)
    was = layer.training
    layer.eval()
    x = torch.randn(2, 64, hidden, generator=g, dtype=torch.float32)
    gy = torch.randn(2, 64, hidden, generator=g)
    out = {}
    ref = None
    params = [p for p in layer.parameters() if p.requires_grad]
    for name, fn in VARIANTS.items():
        for p in params:
            p.grad = None
        xi = x.clone().requires_grad_(True)
        y = fn(layer, xi)
        y.backward(gy)
        got = [y.detach(), xi.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if ref is None:
            ref = got
            continue
        out[name] = max(
            ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            for a, b in zip(got, ref, strict=True)
        )
    layer.train(was)
    with torch.no_grad():
        for p, b in zip(PROJ, saved, strict=True):
            layer.experts[p].lora_B[0].copy_(b)
    for p in layer.parameters():
        p.grad = None
    return out


def time_fwd_bwd(fn, x0: torch.Tensor, gy: torch.Tensor, params) -> float:
    x = x0.detach().requires_grad_(True)
    t0 = time.perf_counter()
    y = fn(x)
    y.backward(gy)
    dt = time.perf_counter() - t0
    for p in params:
        p.grad = None
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", choices=["small", "ffn-heavy"])
    ap.add_argument("--experts", default="8,64")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    peft = Bench(args.model, "peft-lora-r16", args.batch, args.seq, 0.05)
    layers = {}
    for e in [int(v) for v in args.experts.split(",")]:
        b = Bench(args.model, f"moetune-ffn-e{e}", args.batch, args.seq, 0.05)
        layer = b.mlp
        print(
            f"E={e}: max rel. error vs the reference (output, all gradients): {check(layer, b.hidden)}",
            flush=True,
        )
        layers[e] = (b, layer)
    x0, gy = peft.mlp_x, peft.mlp_grad
    cases = {"peft-lora-r16": (lambda x: peft.mlp(x), peft.params)}
    for e, (b, layer) in layers.items():
        for name, fn in VARIANTS.items():
            cases[f"E={e} {name}"] = (lambda x, fn=fn, layer=layer: fn(layer, x), b.params)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(args.repeats + 2):
        for name, (fn, params) in cases.items():
            dt = time_fwd_bwd(fn, x0, gy, params)
            if rep >= 2:
                times[name].append(dt)
    base = statistics.median(times["peft-lora-r16"])
    print(
        f"\n{args.model}, MLP block fwd+bwd, {args.batch}x{args.seq} tokens, "
        f"{args.repeats} interleaved repeats"
    )
    print("| variant | median ms | min–max | × peft LoRA r=16 |\n|---|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m * 1e3:.0f} | {min(ts) * 1e3:.0f}–{max(ts) * 1e3:.0f} | {m / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
