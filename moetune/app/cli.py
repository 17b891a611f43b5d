"""The `moetune` command: train (a YAML config, or the demo), eval, stats, generate, export, convert, merge.

Every MoEConfig field is also a `train` option, with its help text as the option's help. Errors in
the input (missing file, empty data, YAML typo, bad value) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import sys
from typing import Any

from moetune.config import MoEConfig


def _moe_options(parser: argparse.ArgumentParser, demo_moe: dict[str, Any]) -> None:
    group = parser.add_argument_group("MoE options (override the config's `moe` section)")
    for f in dataclasses.fields(MoEConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f"default: {_default(f)}"
        if f.name in demo_moe and demo_moe[f.name] != _default(f):
            default += f"; the demo's: {demo_moe[f.name]}"
        group.add_argument(
            flag,
            dest=f"moe_{f.name}",
            default=None,
            type=_yaml_value,
            metavar="VALUE",
            help=f"{f.metadata['help']} ({default})",
        )


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _yaml_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


OVERWRITE_HELP = "replace what an earlier run wrote there (refused without it when not empty)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moetune", description="Fine-tune language models with a mixture of LoRA experts (MoE-LoRA)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from moetune.app import demo

    about_train = "fine-tune from a YAML config, or run the built-in demo without one"
    train = sub.add_parser("train", help=about_train, description=about_train)
    train.add_argument(
        "config", nargs="?", help="YAML with sections model/moe/data/training; without it, the demo"
    )
    train.add_argument(
        "--output-dir", required=True, help="where adapter/, metrics.json, report.md, routing.png go"
    )
    train.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="optimizer steps (default: the config's training.max_steps)",
    )
    train.add_argument(
        "--train-per-task",
        type=int,
        default=None,
        help=f"the demo's training examples per task (default: {demo.DEFAULT_TRAIN_PER_TASK})",
    )
    train.add_argument(
        "--test-per-task",
        type=int,
        default=None,
        help=f"the demo's held-out items per task (default: {demo.DEFAULT_TEST_PER_TASK})",
    )
    train.add_argument("--seed", type=int, default=None, help="random seed (default: the config's, else 0)")
    train.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last complete checkpoint in OUTPUT_DIR/checkpoints (one is written on "
        "Ctrl-C, and every save_steps with training.save_strategy: steps); give the same other arguments",
    )
    _moe_options(train, demo.DEFAULT_MOE)

    about_eval = "accuracy of a trained adapter, per task with 95% intervals, printed as JSON"
    # argparse %-formats a help line (not a description): its % doubled
    ev = sub.add_parser("eval", help=about_eval.replace("%", "%%"), description=about_eval)
    ev.add_argument("--adapter", required=True, help=ADAPTER_HELP)
    ev.add_argument(
        "--test-per-task",
        type=int,
        default=None,
        help=f"the demo's held-out items per task (default: {demo.DEFAULT_TEST_PER_TASK})",
    )
    ev.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="FILE",
        help="test records to score (JSONL/JSON/CSV, as in training; repeat for several files); default: "
        "the run's own test data",
    )
    ev.add_argument(
        "--base", default=None, help="the base model directory (default: the one the adapter records)"
    )
    ev.add_argument(
        "--harness",
        default=None,
        metavar="TASKS",
        help="score with lm-eval-harness instead: its comma-separated TASKS and metrics, the adapter passed "
        "to its Python API (pip install 'moetune[eval]'); prints its results as JSON",
    )
    ev.add_argument(
        "--include-path", default=None, help="--harness: a folder of your own lm-eval task definitions"
    )
    ev.add_argument(
        "--task", default=None, help="--harness: route every token as this task of the adapter does"
    )
    ev.add_argument("--batch-size", type=int, default=8, help="--harness: lm-eval's batch size (default: 8)")
    ev.add_argument("--all-experts", action="store_true", help=ALL_EXPERTS_HELP)

    about_stats = "routing statistics of an adapter on held-out items: tables, routing.png, task_expert.png"
    st = sub.add_parser("stats", help=about_stats, description=about_stats)
    st.add_argument("--adapter", required=True, help=ADAPTER_HELP)
    st.add_argument(
        "--output-dir", default=None, help="where the PNG plots go (default: next to the adapter)"
    )
    st.add_argument(
        "--test-per-task", type=int, default=50, help="held-out items per task to route (default: 50)"
    )
    st.add_argument("--all-experts", action="store_true", help=ALL_EXPERTS_HELP)

    conv = sub.add_parser(
        "convert", help="convert an adapter between moetune and MoE-PEFT's MixLoRA format (mixlora package)"
    )
    direction = conv.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from", dest="from_format", choices=["mixlora"], help="SRC is in this format; DST: moetune's"
    )
    direction.add_argument(
        "--to", dest="to_format", choices=["mixlora"], help="SRC is a moetune adapter; DST: in this format"
    )
    conv.add_argument("src", help="the adapter directory to read")
    conv.add_argument("dst", help="the adapter directory to write (a new one appears whole)")
    conv.add_argument(
        "--base",
        default=None,
        help="a local base model directory. --from: build the adapter on it (names, shapes, act_fn checked, "
        "its fingerprint recorded; without it none is). --to: its FFN activation gives MixLoRA's act_fn",
    )
    conv.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty DST")
    conv.add_argument(
        "--act-fn", default=None, help="--to: MixLoRA's act_fn (an ACT2FN name, e.g. silu); default: --base's"
    )

    about_generate = "the answer of a trained adapter to one prompt (chat template; greedy unless sampling)"
    gen = sub.add_parser("generate", help=about_generate, description=about_generate)
    gen.add_argument("--adapter", required=True, help=ADAPTER_HELP)
    gen.add_argument("--prompt", required=True, help="the user's message")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default: 64)")
    gen.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 = greedy decoding (default: 0)",
    )
    gen.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: the smallest set of tokens with this "
        "much probability (default: 1.0 = all); with --temperature > 0",
    )
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")

    exp = sub.add_parser(
        "export",
        help="write an adapter as a transformers MoE checkpoint (Mixtral) that serves without moetune",
    )
    exp.add_argument("dst", help="the checkpoint directory to write (config.json, safetensors, tokenizer)")
    exp.add_argument(
        "--to",
        default="mixtral",
        choices=["mixtral", "qwen2_moe"],
        help="mixtral (Llama/Mistral base), qwen2_moe (Qwen2 base)",
    )
    exp.add_argument("--adapter", required=True)
    exp.add_argument(
        "--base", default=None, help="base model directory (default: the adapter's run/provenance)"
    )
    exp.add_argument(
        "--tasks", nargs="+", default=None, help="export only these tasks' experts (default: all)"
    )
    exp.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the base's)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty DST")

    about_merge = (
        "merge an adapter into its base weights (peft's merge_and_unload) and write a plain transformers "
        "model directory; only where every token gets the same mixture (one expert, or one task's)"
    )
    mrg = sub.add_parser("merge", help=about_merge, description=about_merge)
    mrg.add_argument("dst", help="the model directory to write (config.json, safetensors, tokenizer)")
    mrg.add_argument("--adapter", required=True, help=ADAPTER_HELP)
    mrg.add_argument(
        "--task", nargs="+", default=None, help="route as this task (or tasks) does (default: every expert)"
    )
    mrg.add_argument(
        "--base", default=None, help="the base model directory (default: the one the adapter records)"
    )
    mrg.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty DST")
    return parser


# Optional libraries that announce themselves when transformers imports them (torchao: "Failed to load"
# its GPU-only kernels on a CPU machine; bitsandbytes: kernels it would download; torch's pytree: notes
# on torchao's enums). The command's own errors are one line: from these loggers only errors get through.
QUIET_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree")


def keep_freed_memory() -> None:
    """glibc (Linux): keep freed memory in the process instead of returning it to the system, so a CPU
    training step reuses its pages instead of faulting fresh ones in: the same as MALLOC_MMAP_MAX_=0 and
    MALLOC_TRIM_THRESHOLD_ at its maximum (its effect on training steps: docs/benchmarks.md)."""
    if sys.platform != "linux" or os.environ.get("MOETUNE_KEEP_FREED_MEMORY", "1") == "0":
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl...): leave the allocator alone
        return
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters (malloc.h)
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def entry() -> int:
    """The `moetune` command and `python -m moetune`: `main` with the allocator tuned for training."""
    keep_freed_memory()
    return main()


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input, 1 NaN/inf in training, 130 interrupted (Ctrl-C)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)

    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        message = " ".join(str(err).split()) or type(err).__name__  # one line, however many it had
        print(f"moetune {args.command}: error: {message}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"moetune {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        checkpoint = getattr(err, "checkpoint", None)  # moetune.train.callbacks.TrainingInterrupted
        if checkpoint is not None:
            again = shlex.join(["moetune", *[a for a in argv if a != "--resume"], "--resume"])
            print(
                f"moetune {args.command}: interrupted at step {err.step}; checkpoint saved in {checkpoint}; "
                f"resume with: {again}",
                file=sys.stderr,
            )
        else:
            print(f"moetune {args.command}: interrupted", file=sys.stderr)
        return 130


def cmd_train(args: argparse.Namespace) -> int:
    from moetune.app import demo
    from moetune.app.run import check_run, launched_rank, train_and_evaluate
    from moetune.app.run_config import load_run_config

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("moe_") and v is not None}
    if args.config is None:
        check_run(demo.config(), args.output_dir, args.overwrite, args.resume)
        cfg, model, tokenizer, tasks = demo.setup(
            train_per_task=args.train_per_task, test_per_task=args.test_per_task, seed=args.seed
        )
        _override(cfg, args, overrides)
    else:
        from moetune.app.run import tasks_from_config

        cfg = load_run_config(args.config)
        _override(cfg, args, overrides)
        if cfg.stages:
            return _train_stages(args, cfg)
        tasks = tasks_from_config(cfg.data)  # bad data fail here, before a model is loaded
        check_run(cfg, args.output_dir, args.overwrite, args.resume)
        model, tokenizer = demo.load_model(cfg.model, cfg.model_load)
    metrics = train_and_evaluate(model, tokenizer, cfg, tasks, args.output_dir, log=_log, resume=args.resume)
    if launched_rank() != 0:
        return 0
    demo.remember_run(args.output_dir, cfg, args)
    accuracy = (
        f"mean accuracy {100 * metrics['mean_before']:.1f} -> {100 * metrics['mean_after']:.1f}"
        if metrics["mean_after"] is not None
        else "no test data (data.test): accuracy not measured"
    )
    _log(f"{accuracy}; wrote {os.path.join(args.output_dir, 'report.md')}")
    return 0


def _override(cfg: Any, args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    if overrides:
        cfg.moe = MoEConfig(**{**cfg.moe.to_dict(), **overrides})
    if args.max_steps is not None:
        cfg.training["max_steps"] = args.max_steps
    if args.seed is not None:
        cfg.seed = args.seed


def _train_stages(args: argparse.Namespace, cfg: Any) -> int:
    """A continual-learning config (`stages:`): every stage in order, then its report."""
    from moetune.app import demo
    from moetune.app.run import check_run
    from moetune.app.stages import run_stages, stage_tasks

    if args.resume:
        raise ValueError(f"{args.config}: --resume continues one training run; this config has stages")
    stage_tasks(cfg)  # bad data fail here, before a model is loaded
    check_run(cfg, args.output_dir, args.overwrite)
    model, tokenizer = demo.load_model(cfg.model, cfg.model_load)
    run_stages(model, tokenizer, cfg, args.output_dir, log=_log)
    demo.remember_run(args.output_dir, cfg, args)
    _log(f"wrote {os.path.join(args.output_dir, 'report.md')}")
    return 0


ADAPTER_HELP = "an adapter directory: OUTPUT_DIR/adapter of `moetune train`, or one `convert` wrote"
ALL_EXPERTS_HELP = (
    "route every held-out item among all experts; default: an adapter with several tasks, or with "
    "task_routing, runs each task's items under use_tasks([task]) when the data's tasks are its own"
)


def _by_task(model: Any, tasks: Any, args: argparse.Namespace) -> bool:
    """Whether evaluation runs each task's items under `use_tasks([task])` (see ALL_EXPERTS_HELP)."""
    routed = model.moe_config.task_routing != "none" or len(model.tasks) > 1
    return routed and not args.all_experts and set(tasks.test) <= set(model.tasks)


def cmd_eval(args: argparse.Namespace) -> int:
    from moetune.app import demo
    from moetune.app.run import evaluate_tasks

    if args.harness is not None:
        return _harness(args)
    if args.task is not None or args.include_path is not None:
        raise ValueError("--task and --include-path go with --harness")
    model, tokenizer, tasks = demo.load_adapter_run(
        args.adapter, test_per_task=args.test_per_task, data=args.data, base=args.base
    )
    if not tasks.test:
        raise ValueError(f"{args.adapter}: no test items to score (the run had no test data): give --data")
    precision = demo.recorded_autocast(args.adapter)
    by_task = _by_task(model, tasks, args)
    result = evaluate_tasks(model, tokenizer, tasks.test, _log, by_task=by_task, autocast=precision)
    print(json.dumps({t: r["accuracy"] for t, r in result["accuracy"].items()}, indent=2))
    return 0


def _harness(args: argparse.Namespace) -> int:
    """lm-eval-harness on the adapter: its own tasks, prompts and metrics (loglikelihood and generation
    requests go through the moetune model, so routing and task restriction apply)."""
    import importlib.util

    from moetune.app import demo

    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("--harness needs lm-eval-harness: pip install 'moetune[eval]'")
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise FileNotFoundError(f"--include-path {args.include_path}: no such directory")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in args.harness.split(",") if t.strip()]
    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--harness: unknown lm-eval task(s) {unknown} (add --include-path for your own)")
    model, tokenizer, _ = demo.load_adapter_run(args.adapter, test_per_task=0, base=args.base)
    if args.task is not None and args.task not in model.tasks:
        raise ValueError(f"--task {args.task!r}: the adapter's tasks are {model.tasks}")
    routed = model.use_tasks([args.task]) if args.task is not None else contextlib.nullcontext()
    with routed:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
        results = simple_evaluate(model=lm, tasks=names, task_manager=manager, log_samples=False)
    print(json.dumps(results["results"], indent=2, default=str))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from moetune.app import demo
    from moetune.app.plots import load_matrix, plot_routing, plot_task_expert
    from moetune.app.run import evaluate_tasks

    model, tokenizer, tasks = demo.load_adapter_run(args.adapter, test_per_task=args.test_per_task)
    by_task = _by_task(model, tasks, args)
    result = evaluate_tasks(model, tokenizer, tasks.test, lambda _m: None, by_task=by_task)
    out = args.output_dir or os.path.dirname(os.path.abspath(args.adapter))
    os.makedirs(out, exist_ok=True)
    for task, layers in result["routing"].items():
        print(f"\n{task}")
        print(
            f"  {'layer':<40} {'load CV':>8} {'entropy':>8} {'eff.exp':>8} {'eff.load':>8} {'dead':>5}  "
            "tokens per expert"
        )
        for name, s in layers.items():
            print(
                f"  {name[-40:]:<40} {s['load_cv']:8.3f} {s['entropy']:8.3f} {s['effective_experts']:8.2f} "
                f"{s['effective_load']:8.2f} {len(s['dead_experts']):5d}  {s['tokens_per_expert']}"
            )
    plot_routing(result["routing"], os.path.join(out, "routing.png"))
    plot_task_expert(
        {t: load_matrix(layers)[1] for t, layers in result["routing"].items()},
        os.path.join(out, "task_expert.png"),
    )
    _log(f"wrote {os.path.join(out, 'routing.png')} and {os.path.join(out, 'task_expert.png')}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from moetune.interop import mixlora

    _refuse_existing(args.dst, args.overwrite)
    if args.from_format:
        if args.act_fn is not None:
            raise ValueError("--act-fn goes with --to mixlora (imported experts use the FFN's activation)")
        cfg = mixlora.from_mixlora(args.src, args.dst, base=args.base)
        note = "" if args.base else "; no base fingerprint recorded (give --base to record one)"
        _log(f"wrote moetune adapter {args.dst}: {cfg.num_experts} experts, top-{cfg.top_k}, r={cfg.r}{note}")
    else:
        base = args.base
        if base is None and args.act_fn is None and os.path.isdir(args.src):
            from moetune.app import demo

            with contextlib.suppress(FileNotFoundError, ValueError):  # else to_mixlora says what to give
                base = demo.recorded_base(args.src)  # the base export and generate would find
        if base == "smollm2":  # the built-in model: no directory a config could be read from
            from moetune.app import demo

            base = demo.load_model("smollm2")[0]
        data = mixlora.to_mixlora(args.src, args.dst, act_fn=args.act_fn, base=base)
        _log(
            f"wrote MixLoRA adapter {args.dst}: {data['num_experts']} experts, top-{data['top_k']}, "
            f"act_fn={data['act_fn']}"
        )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from moetune.app import demo
    from moetune.app.data import prompt_text
    from moetune.app.evaluation import greedy_answer

    if args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    model, tokenizer, _ = demo.load_adapter_run(args.adapter, test_per_task=0)
    prompt = prompt_text(tokenizer, [("user", args.prompt)])
    if args.temperature == 0:
        print(greedy_answer(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens))
        return 0
    import torch

    torch.manual_seed(args.seed)
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=args.max_new_tokens,
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            pad_token_id=tokenizer.pad_token_id,
        )
    print(tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from moetune.app import demo
    from moetune.interop.export import check_adapter_exportable, export_moe

    _refuse_existing(args.dst, args.overwrite)
    check_adapter_exportable(args.adapter, args.to)
    model, tokenizer = demo.load_for_export(args.adapter, args.base)
    out = export_moe(
        model,
        args.dst,
        args.to,
        tasks=args.tasks,
        dtype=args.dtype,
        tokenizer=tokenizer,
        overwrite=args.overwrite,
    )
    _log(f"wrote {out} ({args.to}): load it with transformers' AutoModelForCausalLM.from_pretrained")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from moetune.app import demo
    from moetune.interop.export import publish_model

    _refuse_existing(args.dst, args.overwrite)
    model, tokenizer, _ = demo.load_adapter_run(args.adapter, test_per_task=0, base=args.base)
    task = args.task[0] if args.task and len(args.task) == 1 else args.task
    merged = model.merge_and_unload(task)
    publish_model(merged, tokenizer, args.dst)
    _log(f"wrote {args.dst}: load it with transformers' AutoModelForCausalLM.from_pretrained")
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "stats": cmd_stats,
    "generate": cmd_generate,
    "export": cmd_export,
    "convert": cmd_convert,
    "merge": cmd_merge,
}


def _refuse_existing(dst: str, overwrite: bool) -> None:
    """A destination that exists and is not an empty directory is replaced only with --overwrite."""
    if os.path.exists(dst) and not overwrite and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ValueError(f"{dst}: exists and is not empty; pass --overwrite to replace it")


def _log(message: str) -> None:
    from moetune.app.run import launched_rank

    if launched_rank() == 0:  # one log under torchrun / accelerate launch
        print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
