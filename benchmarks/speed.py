"""Speed benchmark: moetune vs peft LoRA (and the `mixlora` package) on random-weight Llama models, CPU.

Each configuration lives in its own persistent worker process (so its peak memory is its own); the
parent sends "run one repeat" commands round-robin over the configurations and collects the timings.
Timed per configuration:
  train  forward + backward + AdamW step on the trainable parameters, optimizer.zero_grad
  infer  eval forward under no_grad
  mlp    one MLP block (layer 0) forward + backward on a (batch, seq, hidden) input that requires grad
Memory: before each command a worker collects garbage and calls malloc_trim, resets VmHWM (peak RSS,
/proc/self/clear_refs) and reads it after; the table shows the largest peak seen during a training step
and its rise above the RSS just before the step. With --keep-freed-memory the workers keep what they free
(no malloc_trim, glibc told never to mmap or trim): no page faults after warm-up, compute alone.
Other processes on the machine: the parent measures their CPU share during every command (/proc/stat
minus the worker's own jiffies) and can wait for them (--wait-idle) and retime (--retry-busy); the tables
give ratios of medians, of minima and of CPU seconds (robust when the machine was shared).

    python benchmarks/speed.py                      # full: both models, 10 repeats after 2 warm-ups
    python benchmarks/speed.py --quick              # smoke test: small batch, 3 repeats
    python benchmarks/speed.py --models small --configs peft-lora-r16,moetune-ffn-e8 --out r.json
    python benchmarks/speed.py --from-json r.json     # the tables again from a saved run

Timings on a shared 2-core machine are noisy (about ±10% run to run): compare ratios, within one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from outputs import write_outputs  # benchmarks/outputs.py: scripts run from benchmarks/

MODELS: dict[str, dict[str, int]] = {
    "small": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        vocab_size=32000,
        num_attention_heads=8,
        num_key_value_heads=8,
    ),
    "ffn-heavy": dict(
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=2,
        vocab_size=8000,
        num_attention_heads=16,
        num_key_value_heads=16,
    ),
}

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# name -> (kind, options); every MoE configuration is top-2, r=8, attention LoRA r=8
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "peft-lora-r16": ("peft", dict(r=16)),
    "moetune-ffn-e8": ("moetune", dict(expert_type="ffn", num_experts=8)),
    "moetune-ffn-e32": ("moetune", dict(expert_type="ffn", num_experts=32)),
    "moetune-ffn-e64": ("moetune", dict(expert_type="ffn", num_experts=64)),
    "moetune-dense-e64": ("moetune", dict(expert_type="ffn", num_experts=64, dispatch="dense")),
    "moetune-grouped-e8": ("moetune", dict(expert_type="ffn", num_experts=8, dispatch="grouped")),
    # CPU inference: the dense rank-space path of training instead of slots sorted by expert
    # (MoEFFN.slot_path), or all slots at once instead of pieces of whole experts of about 512 tokens'
    # slots (MoEFFN._slot_pieces)
    "moetune-dense-e8": ("moetune", dict(expert_type="ffn", num_experts=8, dispatch="dense")),
    "moetune-oneblock-e8": ("moetune", dict(expert_type="ffn", num_experts=8, cpu_inference_block=0)),
    "moetune-ref-e8": ("moetune", dict(expert_type="ffn", num_experts=8, reference=True)),
    "moetune-linear-e8": ("moetune", dict(expert_type="linear", num_experts=8)),
    "mixlora-e8": ("mixlora", dict(num_experts=8)),
}
BASELINE = "peft-lora-r16"
PHASES = ("train", "infer", "mlp")


# ==================================================================================================
# building a configuration (used by the workers and by benchmarks/profile_step.py)
# ==================================================================================================
def moe_config(opts: dict[str, Any], dropout: float, **extra: Any):
    """The MoEConfig of a moetune configuration in CONFIGS: top-2, r=8 (alpha 16), attention LoRA r=8."""
    import moetune

    return moetune.MoEConfig(
        expert_type=opts["expert_type"],
        num_experts=opts["num_experts"],
        top_k=2,
        r=8,
        lora_alpha=16,
        attn_r=8,
        lora_dropout=dropout,
        **extra,
    )


class Bench:
    """One configuration on one model, ready to time."""

    def __init__(
        self, model_name: str, config_name: str, batch: int, seq: int, dropout: float, bf16: bool = False
    ) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        self.bf16 = bf16  # bf16 autocast around every forward, float32 weights (Trainer's bf16=True)

        torch.manual_seed(0)
        shape = MODELS[model_name]
        cfg = LlamaConfig(**shape, max_position_embeddings=max(2048, seq), tie_word_embeddings=False)
        base = LlamaForCausalLM(cfg).float()
        kind, opts = CONFIGS[config_name]
        self.kind, self.hidden = kind, shape["hidden_size"]
        self.reference = bool(opts.get("reference"))
        self._mixlora_experts: list[torch.nn.Module] = []
        torch.manual_seed(1)
        if kind == "peft":
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(
                r=opts["r"],
                lora_alpha=2 * opts["r"],
                lora_dropout=dropout,
                target_modules=ATTN + MLP,
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(base, lcfg)
            params = [p for p in self.model.parameters() if p.requires_grad]
        elif kind == "moetune":
            import moetune

            self.model = moetune.get_moe_model(base, moe_config(opts, dropout))
            # "auto": grouped GEMMs when E is large
            self.model._ctx.options.dispatch = opts.get("dispatch", "auto")
            if "cpu_inference_block" in opts:
                self.model._ctx.options.cpu_inference_block = opts["cpu_inference_block"]
            params = [p for p in self.model.parameters() if p.requires_grad]
        elif kind == "mixlora":
            self.model, params, self._mixlora_experts = _build_mixlora(base, opts["num_experts"], dropout)
        else:
            raise ValueError(kind)
        self.params = params
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        g = torch.Generator().manual_seed(2)
        self.input_ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=g)
        self.attention_mask = torch.ones(batch, seq, dtype=torch.long)
        self.mlp_x = torch.randn(batch, seq, self.hidden, generator=g)
        self.mlp_grad = torch.randn(batch, seq, self.hidden, generator=g)
        self.mlp = next(m for n, m in self.model.named_modules() if n.endswith("layers.0.mlp"))
        self.tokens = batch * seq
        self.set_train(True)

    # ---- helpers -------------------------------------------------------------------------------
    def path(self):
        import contextlib

        import torch

        stack = contextlib.ExitStack()
        if self.reference:
            stack.enter_context(self.model.reference_path())
        if self.bf16:
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        return stack

    def set_train(self, mode: bool) -> None:
        self.model.train(mode)
        for m in self._mixlora_experts:  # mixlora keeps experts in dicts: .train()/.eval() miss them
            m.train(mode)

    # ---- the timed operations ------------------------------------------------------------------
    def train_step(self) -> None:
        with self.path():
            out = self.model(
                input_ids=self.input_ids, attention_mask=self.attention_mask, labels=self.input_ids
            )
            out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def infer(self) -> None:
        import torch

        self.set_train(False)
        try:
            with torch.no_grad(), self.path():
                self.model(input_ids=self.input_ids, attention_mask=self.attention_mask)
        finally:
            self.set_train(True)

    def mlp_step(self) -> None:
        x = self.mlp_x.detach().requires_grad_(True)
        with self.path():
            y = self.mlp(x)
            y.backward(self.mlp_grad.to(y.dtype))
        for p in self.params:
            p.grad = None

    def run(self, phase: str) -> None:
        {"train": self.train_step, "infer": self.infer, "mlp": self.mlp_step}[phase]()


def _build_mixlora(base, num_experts: int, dropout: float):
    """mixlora 0.2.3 on `base`: E experts top-2 r=8 on gate/up/down, attention LoRA r=8 (alpha 16)."""
    import math

    import torch
    from mixlora import MixLoraConfig, inject_adapter_in_model

    if dropout <= 0:
        raise ValueError("mixlora 0.2.3 asserts lora_dropout > 0: use --lora-dropout > 0")
    r = 8
    cfg = MixLoraConfig.from_config(
        {
            "base_model_name_or_path": "random-llama",
            "task_type": "CAUSAL_LM",
            "peft_type": "MIXLORA",
            "r": r,
            "lora_alpha": 16,
            "lora_dropout": dropout,
            "target_modules": ATTN + MLP,
            "routing_strategy": "mixlora",
            "num_experts": num_experts,
            "top_k": 2,
            "act_fn": "silu",  # must be explicit (None is not resolved to the FFN's activation)
        }
    )
    cfg.adapter_name_, cfg.dtype_ = "default", torch.float32
    cfg.check()
    base.requires_grad_(False)
    weights: dict[str, torch.Tensor] = {}
    gates = []

    device = next(base.parameters()).device  # the adapter's tensors where the base is (a GPU)

    def lora(prefix: str, d_in: int, d_out: int) -> None:
        bound = 1.0 / math.sqrt(d_in)
        weights[f"{prefix}.lora_A.weight"] = torch.empty(r, d_in).uniform_(-bound, bound).to(device)
        weights[f"{prefix}.lora_B.weight"] = torch.zeros(d_out, r, device=device)

    for i, layer in enumerate(base.model.layers):
        for p in ATTN:
            lin = getattr(layer.self_attn, p)
            lora(f"mixlora.layers.{i}.self_attn.{p}", lin.in_features, lin.out_features)
        for p in MLP:
            lin = getattr(layer.mlp, p)
            for e in range(num_experts):
                lora(f"mixlora.layers.{i}.mlp.{p}.experts.{e}", lin.in_features, lin.out_features)
        gate = (torch.randn(num_experts, base.config.hidden_size) * 0.02).to(device).requires_grad_(True)
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = gate
        gates.append(gate)
    inject_adapter_in_model(base, cfg, weights)
    experts = [
        lin
        for layer in base.model.layers
        for moe in layer.mlp.mixlora_moes.values()
        for lin in moe.experts_.values()
    ]
    params = [p for p in base.parameters() if p.requires_grad]  # attention LoRA (registered submodules)
    params += [p for lin in experts for p in (lin.lora_A.weight, lin.lora_B.weight)]
    params += [moe.gate_ for layer in base.model.layers for moe in layer.mlp.mixlora_moes.values()]
    assert all(g.requires_grad for g in gates)
    return base, params, experts


# ==================================================================================================
# worker process
# ==================================================================================================
def _proc_status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])  # kB
    return -1


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give free heap memory back to the OS (glibc), so an idle worker holds little more than its model.

    Measured on ffn-heavy peft: idle RSS 2.7 GB -> 1.0 GB, the next training step within 1% of the time."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker_main(spec: dict[str, Any]) -> None:
    # the protocol owns the real stdout; anything else printed (warnings, C code) goes to stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    import torch

    torch.set_num_threads(spec["threads"])
    try:
        bench = Bench(
            spec["model"],
            spec["config"],
            spec["batch"],
            spec["seq"],
            spec["dropout"],
            spec.get("bf16", False),
        )
    except Exception as err:  # reported to the parent, which skips this configuration
        send({"error": f"{type(err).__name__}: {err}"})
        return
    keep = spec.get("keep_freed_memory", False)
    gc.collect()
    if not keep:
        _malloc_trim()
    send(
        {
            "ready": True,
            "trainable_params": bench.trainable,
            "build_peak_kb": _proc_status("VmHWM"),
            "rss_after_build_kb": _proc_status("VmRSS"),
            "threads": torch.get_num_threads(),
        }
    )
    hwm_ok = True
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            # ru_maxrss is not the lifetime peak here: clear_refs resets it along with VmHWM
            send({"ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})
            return
        gc.collect()
        if not keep:
            _malloc_trim()
        hwm_ok = _reset_hwm() and hwm_ok
        rss0 = _proc_status("VmRSS")
        try:
            r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
            bench.run(cmd["op"])
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
        except Exception as err:
            send({"error": f"{type(err).__name__}: {err}"})
            return
        send(
            {
                "t": dt,
                "cpu": cpu,
                "sys": r1.ru_stime - r0.ru_stime,  # kernel time: page faults, mostly
                "minflt": r1.ru_minflt - r0.ru_minflt,
                "rss_before_kb": rss0,
                "hwm_kb": _proc_status("VmHWM") if hwm_ok else -1,
            }
        )


class Worker:
    def __init__(self, spec: dict[str, Any], logdir: str) -> None:
        self.name = spec["config"]
        self.log_path = os.path.join(logdir, f"{spec['model']}-{self.name}.log")
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
        if spec.get("omp_wait_policy"):
            env["OMP_WAIT_POLICY"] = spec["omp_wait_policy"]
        if spec.get("keep_freed_memory"):
            # glibc: every allocation from the heap (none mmap'd), and the heap never trimmed
            env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**62))
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
            env=env,
        )
        self.info: dict[str, Any] = {}
        self.error: str | None = None

    def recv(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            with open(self.log_path) as fh:
                tail = fh.read()[-2000:]
            raise RuntimeError(f"worker {self.name} died:\n{tail}")
        return json.loads(line)

    def wait_ready(self) -> None:
        try:
            msg = self.recv()
        except RuntimeError as err:
            msg = {"error": str(err)}
        if "error" in msg:
            self.error = msg["error"]
        else:
            self.info = msg

    def _jiffies(self) -> int:
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, all threads

    def do(self, op: str) -> dict[str, Any]:
        """Run one command; msg["others"] = CPU share other processes took meanwhile (nan if unknown)."""
        try:
            (b0, t0), w0 = _cpu_jiffies(), self._jiffies()
        except (OSError, IndexError, ValueError):
            b0 = None
        try:
            self.proc.stdin.write(json.dumps({"op": op}) + "\n")
            self.proc.stdin.flush()
            msg = self.recv()
        except (RuntimeError, OSError) as err:  # the worker died (e.g. killed for memory)
            msg = {"error": str(err)}
        if "error" in msg:
            self.error = msg["error"]
            return msg
        msg["others"] = float("nan")
        if b0 is not None:
            try:
                (b1, t1), w1 = _cpu_jiffies(), self._jiffies()
                msg["others"] = max(0.0, ((b1 - b0) - (w1 - w0)) / max(1, t1 - t0))
            except (OSError, IndexError, ValueError):
                pass
        return msg

    def close(self) -> None:
        if self.proc.poll() is None and self.error is None:
            self.info.update(self.do("quit"))
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ==================================================================================================
# parent: schedule, statistics, report
# ==================================================================================================
def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        vals = [int(v) for v in fh.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals) - idle, sum(vals)


def others_busy(seconds: float = 1.0) -> float:
    """Fraction of the machine's CPU time used by other processes, sampled while every worker waits."""
    try:
        b0, t0 = _cpu_jiffies()
        time.sleep(seconds)
        b1, t1 = _cpu_jiffies()
    except OSError:
        return float("nan")
    return (b1 - b0) / max(1, t1 - t0)


def wait_idle(limit_s: float, threshold: float, model: str) -> float:
    """Wait (up to limit_s) until other processes use less than `threshold` of the CPUs; the last sample."""
    busy = others_busy()
    waited = 0.0
    while busy > threshold and waited < limit_s:
        if waited == 0:
            print(
                f"[{model}] other processes use {busy:.0%} of the CPUs: waiting", file=sys.stderr, flush=True
            )
        time.sleep(4.0)
        waited += 5.0
        busy = others_busy()
    return busy


def summarize(samples: list[float]) -> dict[str, Any]:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 2 else [s[0]] * 3
    return {
        "median": statistics.median(s),
        "q1": q[0],
        "q3": q[2],
        "min": s[0],
        "max": s[-1],
        "n": len(s),
        "samples": samples,
    }


def run_model(
    model: str, configs: list[str], args: argparse.Namespace, logdir: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    base_spec = dict(
        model=model,
        batch=args.batch,
        seq=args.seq,
        dropout=args.lora_dropout,
        bf16=args.bf16,
        threads=args.threads,
        omp_wait_policy=args.omp_wait_policy,
        keep_freed_memory=args.keep_freed_memory,
    )
    workers = [Worker(dict(base_spec, config=c), logdir) for c in configs]
    for w in workers:  # they build concurrently; wait for all
        w.wait_ready()
        if w.error:
            print(f"[{model}] {w.name}: skipped ({w.error})", file=sys.stderr)
    live = [w for w in workers if not w.error]
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {w.name: {p: [] for p in args.phases} for w in live}
    total = args.warmup + args.repeats
    t_start = time.time()
    load: list[float] = []  # 1-minute load average after each round
    busy: list[float] = []  # CPU share of other processes measured just before each round
    busy_retries = 0
    for rep in range(total):
        busy.append(wait_idle(args.wait_idle, args.idle_threshold, model))
        shift = rep % max(1, len(live))
        order = live[shift:] + live[:shift]  # rotate who goes first in each round
        for phase in args.phases:
            for w in order:
                if w.error:
                    continue
                msg = w.do(phase)
                tries = 0
                # another process took CPU during the command: with 2 OpenMP threads on 2 cores the
                # timing is then meaningless (spin-waits); wait for the machine and time it again
                while not w.error and msg["others"] > args.idle_threshold * 2 and tries < args.retry_busy:
                    tries += 1
                    busy_retries += 1
                    wait_idle(args.wait_idle, args.idle_threshold, model)
                    msg = w.do(phase)
                if w.error:
                    print(f"[{model}] {w.name} {phase}: failed ({w.error})", file=sys.stderr)
                    continue
                msg["retries"] = tries
                if rep >= args.warmup:
                    samples[w.name][phase].append(msg)
        tag = "warm-up" if rep < args.warmup else f"repeat {rep - args.warmup + 1}/{args.repeats}"
        load.append(os.getloadavg()[0])
        print(
            f"[{model}] {tag} done ({time.time() - t_start:.0f} s, load {load[-1]:.2f}, "
            f"others' CPU before the round {busy[-1]:.0%})",
            file=sys.stderr,
            flush=True,
        )
    for w in workers:
        w.close()

    rounds = {
        "load_avg_1min": load,
        "others_busy_before": busy,
        "busy_retries": busy_retries,
        "wall_s": time.time() - t_start,
    }
    out: dict[str, Any] = {}
    tokens = args.batch * args.seq
    for w in workers:
        if w.error and (w.name not in samples or not samples[w.name][args.phases[0]]):
            out[w.name] = {"error": w.error}
            continue
        res: dict[str, Any] = {"trainable_params": w.info.get("trainable_params")}
        for phase in args.phases:
            msgs = samples[w.name][phase]
            if not msgs:
                continue
            st = summarize([m["t"] for m in msgs])
            st["tokens_per_s"] = tokens / st["median"]
            # CPU seconds of the worker (all its threads): less sensitive to other processes on the machine
            st["cpu_median"] = statistics.median(m["cpu"] for m in msgs)
            st["cpu_samples"] = [m["cpu"] for m in msgs]
            st["sys_samples"] = [m.get("sys") for m in msgs]
            st["minflt_samples"] = [m.get("minflt") for m in msgs]
            _add_user_cpu(st)
            st["others_samples"] = [m["others"] for m in msgs]  # other processes' CPU share per sample
            others = [o for o in st["others_samples"] if o == o]
            st["others_cpu_max"] = max(others) if others else None
            st["peak_rss_mb"] = max(m["hwm_kb"] for m in msgs) / 1024
            st["peak_over_start_mb"] = max(m["hwm_kb"] - m["rss_before_kb"] for m in msgs) / 1024
            res[phase] = st
        res["rss_after_build_mb"] = w.info.get("rss_after_build_kb", 0) / 1024
        res["build_peak_mb"] = w.info.get("build_peak_kb", 0) / 1024
        if w.error:
            res["error"] = w.error
        out[w.name] = res
    return out, rounds


def _add_user_cpu(st: dict[str, Any]) -> None:
    """st["usr_median"]: median user CPU seconds, i.e. without the kernel's (page-fault) time, which
    varies with the machine's memory state more than with the code (benchmarks/README.md, Noise)."""
    sys_s = st.get("sys_samples") or [None]
    if all(v is not None for v in sys_s):
        st["usr_median"] = statistics.median(c - k for c, k in zip(st["cpu_samples"], sys_s, strict=True))


def ratios(res: dict[str, Any], phases: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per config and phase, ÷ peft LoRA r=16: `p` medians, `p_min` minima, `p_cpu` median CPU seconds,
    `p_usr` median user CPU seconds (CPU time less kernel time).

    With other processes sharing the machine some samples are inflated by several times; the minima and
    the CPU-time ratios are then the robust estimates (they agreed within a few % in contended runs)."""
    base = res.get(BASELINE, {})
    out: dict[str, dict[str, float]] = {}
    for name, r in res.items():
        if "error" in r and not any(p in r for p in phases):
            continue
        d: dict[str, float] = {}
        for p in phases:
            if p in r and p in base:
                d[p] = r[p]["median"] / base[p]["median"]
                d[p + "_min"] = r[p]["min"] / base[p]["min"]
                d[p + "_cpu"] = r[p]["cpu_median"] / base[p]["cpu_median"]
                if r[p].get("usr_median") and base[p].get("usr_median"):
                    d[p + "_usr"] = r[p]["usr_median"] / base[p]["usr_median"]
        if "train" in r and "train" in base:
            d["train_peak_mem"] = r["train"]["peak_rss_mb"] / base["train"]["peak_rss_mb"]
            if base["train"]["peak_over_start_mb"] > 0:
                d["train_mem_over_start"] = (
                    r["train"]["peak_over_start_mb"] / base["train"]["peak_over_start_mb"]
                )
        out[name] = d
    return out


def contended(res: dict[str, Any], threshold: float = 0.2) -> bool:
    """Whether other processes took more than `threshold` of the CPUs during some kept sample."""
    return any((r[p].get("others_cpu_max") or 0) > threshold for r in res.values() for p in PHASES if p in r)


def targets(res: dict[str, Any], rat: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The issue's targets as measured ratios (median, min, CPU time) and pass/fail.

    The verdict uses the medians on a quiet machine and the minima when the run was contended."""
    basis = "min" if contended(res) else "median"

    def stat(cfg: str, phase: str, key: str) -> float | None:
        r = res.get(cfg, {})
        return r[phase].get(key) if phase in r else None

    def between(a: str, b: str, phase: str) -> dict[str, float | None]:
        out = {}
        keys = (("median", "median"), ("min", "min"), ("cpu", "cpu_median"), ("usr", "usr_median"))
        for label, key in keys:
            x, y = stat(a, phase, key), stat(b, phase, key)
            out[label] = x / y if x and y else None
        return out

    checks = []

    def add(what: str, values: dict[str, float | None], limit: float) -> None:
        value = values.get(basis)
        if value is None:
            value = values.get("median")
        if value is not None:
            checks.append(
                {"target": what, "ratio": value, "basis": basis, "limit": limit, "pass": value <= limit}
                | {f"ratio_{k}": v for k, v in values.items()}
            )

    e8 = "moetune-ffn-e8"
    add("E=8 training step / peft LoRA r=16", between(e8, BASELINE, "train"), 1.20)
    add("E=8 inference / peft LoRA r=16", between(e8, BASELINE, "infer"), 1.10)
    mem = rat.get(e8, {}).get("train_peak_mem")
    add("E=8 peak memory (train) / peft LoRA r=16", {"median": mem, "min": mem}, 1.15)
    add("E=64 training step / E=8", between("moetune-ffn-e64", e8, "train"), 1.35)
    add("E=8 training step / mixlora E=8", between(e8, "mixlora-e8", "train"), 0.80)
    return checks


def fmt_t(st: dict[str, Any]) -> str:
    return f"{st['median'] * 1e3:.0f} [{st['q1'] * 1e3:.0f}–{st['q3'] * 1e3:.0f}]"


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"batch {meta['batch']}×{meta['seq']} tokens, {meta['threads']} threads, "
        f"{'bf16 autocast (float32 weights)' if meta.get('bf16') else 'fp32'}, lora_dropout "
        f"{meta['lora_dropout']}, {meta['repeats']} repeats after {meta['warmup']} warm-up, interleaved"
        f"{', OMP_WAIT_POLICY=' + meta['omp_wait_policy'] if meta.get('omp_wait_policy') else ''}"
        f"{', freed memory kept (no page faults after warm-up)' if meta.get('keep_freed_memory') else ''}. "
        "Times in ms: median [IQR], then the minimum; × = ratio of medians to peft LoRA r=16, min× of "
        "minima, cpu× of the workers' median CPU seconds, usr× of their median user CPU seconds (CPU time "
        "less kernel time, mostly page faults); mem = peak RSS during a training step, MB (rise above the "
        "RSS before the step).",
        "",
    ]
    nan = float("nan")
    for model, res in results["models"].items():
        rat = results["ratios"][model]
        rounds = results.get("rounds", {}).get(model, {})
        load = rounds.get("load_avg_1min", [])
        busy = [b for b in rounds.get("others_busy_before", []) if b == b]
        head = f"### {model} ({', '.join(f'{k}={v}' for k, v in MODELS[model].items())})"
        notes = []
        if load:
            notes.append(f"1-min load average over the rounds {min(load):.1f}–{max(load):.1f}")
        others = [
            r[p]["others_cpu_max"] for r in res.values() for p in PHASES if r.get(p, {}).get("others_cpu_max")
        ]
        if busy or others:
            notes.append(
                f"other processes' CPU share: before a round up to {max(busy or [nan]):.0%}, during a kept "
                f"sample up to {max(others or [nan]):.0%} ({rounds.get('busy_retries', 0)} samples retimed)"
            )
        lines += [head, ""] + ([f"_{'; '.join(notes)}_", ""] if notes else [])
        lines += [
            "| config | train step ms | min | tok/s | × | min× | cpu× | usr× | infer ms | min | × | min× "
            "| MLP fwd+bwd ms | min | × | min× | train mem MB | × | trainable |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in res.items():
            if not any(phase in r for phase in PHASES):
                lines.append(f"| {name} | {r.get('error', 'no data')} |" + " |" * 17)
                continue
            x = rat.get(name, {})

            def cols(phase: str, r=r, x=x) -> str:
                if phase not in r:
                    return "– | – | – | –"
                st = r[phase]
                return (
                    f"{fmt_t(st)} | {st['min'] * 1e3:.0f} | {x.get(phase, nan):.2f} | "
                    f"{x.get(phase + '_min', nan):.2f}"
                )

            train, mem = "– | – | – | – | – | – | –", "– | –"  # without a train phase (--phases)
            if "train" in r:
                tr = r["train"]
                train = (
                    f"{fmt_t(tr)} | {tr['min'] * 1e3:.0f} | {tr['tokens_per_s']:.0f} "
                    f"| {x.get('train', nan):.2f} | {x.get('train_min', nan):.2f} "
                    f"| {x.get('train_cpu', nan):.2f} | {x.get('train_usr', nan):.2f}"
                )
                mem = (
                    f"{tr['peak_rss_mb']:.0f} (+{tr['peak_over_start_mb']:.0f}) "
                    f"| {x.get('train_peak_mem', nan):.2f}"
                )
            lines.append(
                f"| {name} | {train} | {cols('infer')} | {cols('mlp')} | {mem} | {r['trainable_params']:,} |"
            )
        lines += [
            "",
            "| target | median ratio | min ratio | cpu ratio | user-CPU ratio | limit | verdict (on) |",
            "|---|---|---|---|---|---|---|",
        ]

        def f(v: float | None) -> str:
            return "–" if v is None else f"{v:.2f}"

        for c in results["targets"][model]:
            verdict = "PASS" if c["pass"] else "FAIL"
            lines.append(
                f"| {c['target']} | {f(c.get('ratio_median'))} | {f(c.get('ratio_min'))} "
                f"| {f(c.get('ratio_cpu'))} | {f(c.get('ratio_usr'))} | ≤ {c['limit']:.2f} "
                f"| {verdict} ({c.get('basis', 'median')}) |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Time moetune vs peft LoRA (and mixlora) training steps, inference and the MLP block "
        "on random-weight Llama models, one worker process per configuration, interleaved.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--models", default="small,ffn-heavy", help=f"comma list of {list(MODELS)}")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--batch", type=int, default=None, help="sequences per batch (default 8; 2 with --quick)")
    ap.add_argument(
        "--seq", type=int, default=None, help="tokens per sequence (default 256; 64 with --quick)"
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10; 3 with --quick)")
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed rounds first (default 2; 1 with --quick)"
    )
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {list(PHASES)}")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    ap.add_argument(
        "--lora-dropout", type=float, default=0.05, help="LoRA dropout of every config (mixlora needs > 0)"
    )
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before each round wait up to this many seconds while other processes keep the CPUs busy "
        "(with 2 OpenMP threads on 2 shared cores, timings become meaningless: spinning threads)",
    )
    ap.add_argument(
        "--idle-threshold", type=float, default=0.10, help="CPU share of other processes counted as idle"
    )
    ap.add_argument(
        "--retry-busy",
        type=int,
        default=3,
        help="time a command again (up to this many times) when other processes took more than "
        "2 x --idle-threshold of the CPUs while it ran",
    )
    ap.add_argument(
        "--omp-wait-policy",
        choices=["ACTIVE", "PASSIVE"],
        default=None,
        help="OMP_WAIT_POLICY for the workers (default: inherit). PASSIVE keeps timings sane when other "
        "processes share the cores (measured: 1.4x slower instead of 30x) but is not the default setup",
    )
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="workers keep the memory they free (glibc MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_ at its "
        "maximum, no malloc_trim): after warm-up a command touches no fresh pages, so the times measure "
        "compute without page faults; peak memory is then the heap's high-water mark",
    )
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast around forward and backward, float32 weights (as the Trainer's bf16=True)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: batch 2×64, 1 warm-up, 3 repeats")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--markdown", default=None, help="also write the Markdown table here")
    ap.add_argument(
        "--from-json",
        default=None,
        help="render the tables and targets again from a saved --out file (no timing)",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    args.batch = args.batch or (2 if q else 8)
    args.seq = args.seq or (64 if q else 256)
    args.repeats = args.repeats if args.repeats is not None else (3 if q else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.models = [m for m in args.models.split(",") if m]
    args.configs = [c for c in args.configs.split(",") if c]
    args.phases = tuple(p for p in args.phases.split(",") if p)
    for m in args.models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; known: {list(MODELS)}")
    for c in args.configs:
        if c not in CONFIGS:
            ap.error(f"unknown config {c!r}; known: {list(CONFIGS)}")
    for p in args.phases:
        if p not in PHASES:
            ap.error(f"unknown phase {p!r}; known: {list(PHASES)}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    if args.from_json:
        with open(args.from_json) as fh:
            results = json.load(fh)
        phases = tuple(results["meta"].get("phases", PHASES))
        for model, res in results["models"].items():
            for r in res.values():
                for phase in phases:
                    if phase in r:
                        _add_user_cpu(r[phase])
            results["ratios"][model] = ratios(res, phases)
            results["targets"][model] = targets(res, results["ratios"][model])
        write_results(results, results["meta"], args)
        print(markdown(results, results["meta"]))
        return 0
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for pkg in ("peft", "mixlora"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = None
    meta = dict(
        batch=args.batch,
        seq=args.seq,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        lora_dropout=args.lora_dropout,
        bf16=args.bf16,
        phases=list(args.phases),
        omp_wait_policy=args.omp_wait_policy or os.environ.get("OMP_WAIT_POLICY"),
        keep_freed_memory=args.keep_freed_memory,
        versions=versions,
        cpu=platform.processor() or platform.machine(),
        nproc=os.cpu_count(),
        argv=sys.argv,
        note="timings on a shared 2-core machine are noisy (about ±10% run to run)",
    )
    results: dict[str, Any] = {"meta": meta, "models": {}, "ratios": {}, "targets": {}, "rounds": {}}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="moetune-speed-") as logdir:
        for model in args.models:
            res, rounds = run_model(model, args.configs, args, logdir)
            results["models"][model] = res
            results["rounds"][model] = rounds
            results["ratios"][model] = ratios(res, args.phases)
            results["targets"][model] = targets(res, results["ratios"][model])
            meta["wall_s"] = time.time() - t0
            write_results(results, meta, args)  # after each model: a later crash keeps what was measured
    print(markdown(results, meta))
    return 0


def write_results(results: dict[str, Any], meta: dict[str, Any], args: argparse.Namespace) -> None:
    write_outputs(args.out, results, args.markdown, markdown(results, meta) + "\n", indent=1)


if __name__ == "__main__":
    sys.exit(main())
