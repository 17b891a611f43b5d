"""Profile training steps of one benchmark configuration with torch.profiler (CPU).

    python benchmarks/profile_step.py --model small --config moetune-ffn-e8
    python benchmarks/profile_step.py --model small --config moetune-ffn-e64 --steps 3 --rows 30

Prints the top aten ops by self CPU time, the backward nodes by total time, and the time spent inside
moetune's functions (forward only: they are wrapped in record_function regions here, at run time;
the library itself is not changed). Uses the same model/config builders as benchmarks/speed.py.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from speed import CONFIGS, MODELS, Bench  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

# moetune functions to label in the trace (module, attribute path)
LABELS = [
    ("moetune.model", "MoEModel._balance_losses"),
    ("moetune.model", "MoEModel._check_finite"),
    ("moetune.core.layers", "MoEFFN._fast"),
    ("moetune.core.layers", "MoEFFN._reference"),
    ("moetune.core.layers", "MoELinear.forward"),
    ("moetune.core.layers", "RoutedLayer.route"),
    ("moetune.core.layers", "RoutedLayer._slots"),
    ("moetune.core.layers", "LoRALinear.forward"),
    ("moetune.core.routing", "Router.forward"),
    ("moetune.core.experts", "LoRAExperts.add_per_slot"),
    ("moetune.core.experts", "LoRAExperts.reduce_slots"),
    ("moetune.core.experts", "GroupedSlots.add_delta"),
    ("moetune.core.experts", "GroupedSlots.out_delta"),
    ("moetune.core.experts", "SortedSlots.add_delta"),
    ("moetune.core.experts", "SortedSlots.out_delta"),
    ("moetune.core.experts", "SlotGroups.build"),
    ("moetune.core.experts", "LoRAExperts.dense"),
    ("moetune.core.experts", "LoRAExperts.expert"),
    ("moetune.core.layers", "accumulate_stats"),
]


def label_moetune() -> None:
    import importlib

    for mod_name, path in LABELS:
        mod = importlib.import_module(mod_name)
        owner, _, attr = path.rpartition(".")
        target = getattr(mod, owner) if owner else mod
        fn = getattr(target, attr)

        def wrap(fn=fn, label=f"moetune::{path}"):
            @functools.wraps(fn)
            def inner(*a, **k):
                with record_function(label):
                    return fn(*a, **k)

            return inner

        setattr(target, attr, wrap())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", choices=list(MODELS))
    ap.add_argument("--config", default="moetune-ffn-e8", choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps")
    ap.add_argument("--phase", default="train", choices=["train", "infer", "mlp"], help="what to profile")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--no-labels", action="store_true", help="do not wrap moetune functions")
    ap.add_argument("--trace", default=None, help="write a Chrome trace here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if not args.no_labels:
        label_moetune()
    bench = Bench(args.model, args.config, args.batch, args.seq, args.lora_dropout)
    for _ in range(args.warmup):
        bench.run(args.phase)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            bench.run(args.phase)
    wall = (time.perf_counter() - t0) / args.steps
    ka = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in ka)
    print(
        f"# {args.phase}: {args.config} on {args.model}: {wall * 1e3:.0f} ms/step under the profiler, "
        f"{args.steps} steps"
    )
    print(
        "\n## top ops by self CPU time (ms per step; % of all self time, "
        f"{total_self / args.steps / 1e3:.0f} ms)"
    )
    print("| op | self ms | % | calls/step |\n|---|---|---|---|")
    ops = sorted((e for e in ka if not e.key.startswith("moetune::")), key=lambda e: -e.self_cpu_time_total)
    for e in ops[: args.rows]:
        print(
            f"| {e.key} | {e.self_cpu_time_total / args.steps / 1e3:.1f} "
            f"| {100 * e.self_cpu_time_total / total_self:.1f} | {e.count / args.steps:.0f} |"
        )
    print("\n## backward nodes by total CPU time (ms per step)")
    print("| node | total ms | calls/step |\n|---|---|---|")
    nodes = sorted(
        (e for e in ka if e.key.startswith("autograd::engine::evaluate_function")),
        key=lambda e: -e.cpu_time_total,
    )
    for e in nodes[: args.rows]:
        name = e.key.replace("autograd::engine::evaluate_function: ", "")
        print(f"| {name} | {e.cpu_time_total / args.steps / 1e3:.1f} | {e.count / args.steps:.0f} |")
    print("\n## moetune functions, forward only (ms per step, inclusive; nested regions overlap)")
    print("| function | total ms | calls/step |\n|---|---|---|")
    for e in sorted((e for e in ka if e.key.startswith("moetune::")), key=lambda e: -e.cpu_time_total):
        print(f"| {e.key} | {e.cpu_time_total / args.steps / 1e3:.1f} | {e.count / args.steps:.0f} |")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
