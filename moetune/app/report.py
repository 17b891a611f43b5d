"""`report.md` of a run: accuracy before/after with 95% intervals, routing balance, settings."""

from __future__ import annotations

import os
from typing import Any

from moetune.core.stats import min_share_times_experts
from moetune.io.atomic import atomic_write_text


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def write_report(metrics: dict[str, Any], path: str | os.PathLike) -> None:
    lines = ["# moetune run report", ""]
    if metrics["mean_after"] is None:
        lines += ["No test data (`data.test`): accuracy and routing on held-out data were not measured.", ""]
    else:
        lines += _accuracy_and_routing(metrics)
    lines += [
        "## Settings",
        "",
        f"- training examples: {metrics['train_examples']}, training time: {metrics['train_seconds']} s",
        f"- trainable parameters: {metrics['trainable_parameters']:,}",
        f"- MoE: `{_moe_summary(metrics['moe_config'])}`",
        f"- training arguments: `{metrics['training']}`",
        "",
    ]
    atomic_write_text(os.fspath(path), "\n".join(lines))


def _accuracy_and_routing(metrics: dict[str, Any]) -> list[str]:
    lines = [
        "## Accuracy (95% Wilson intervals)",
        "",
        "| task | n | before | after | change |",
        "|---|---|---|---|---|",
    ]
    for task, after in metrics["after_detail"].items():
        before = metrics["before_detail"][task]
        lines.append(
            f"| {task} | {after['n']} | {_pct(before['accuracy'])} [{_pct(before['ci95_low'])}, "
            f"{_pct(before['ci95_high'])}] | {_pct(after['accuracy'])} [{_pct(after['ci95_low'])}, "
            f"{_pct(after['ci95_high'])}] | {100 * (after['accuracy'] - before['accuracy']):+.1f} |"
        )
    lines.append(
        f"| **mean** | | {_pct(metrics['mean_before'])} | {_pct(metrics['mean_after'])} | "
        f"{100 * (metrics['mean_after'] - metrics['mean_before']):+.1f} |"
    )
    lines += [
        "",
        "## Routing on held-out data (after)",
        "",
        "Smallest share of routed slots any expert of any layer receives, times E (1.0 = perfectly even), "
        "over all held-out tokens and per task (experts may specialise); the effective numbers of experts "
        "(exp of an entropy, averaged over layers: E = even, 1 = collapse onto one expert) per token "
        "(the experts a token mixes) and of the load (the experts sharing the work); routing.png shows "
        "every layer.",
        "",
        "| tokens | min share × E | mean load CV | effective experts per token | effective load | dead |",
        "|---|---|---|---|---|---|",
    ]
    for group, layers in metrics["routing"].items():
        n = max(len(layers), 1)
        cv, per_token, load = (
            sum(s[k] for s in layers.values()) / n for k in ("load_cv", "effective_experts", "effective_load")
        )
        dead = sum(len(s["dead_experts"]) for s in layers.values())
        worst = min_share_times_experts(layers)
        lines.append(f"| {group} | {worst:.2f} | {cv:.3f} | {per_token:.2f} | {load:.2f} | {dead} |")
    return [*lines, ""]


def _moe_summary(cfg: dict[str, Any]) -> str:
    keys = (
        "expert_type",
        "num_experts",
        "top_k",
        "router",
        "r",
        "lora_alpha",
        "attn_r",
        "aux_loss_coef",
        "z_loss_coef",
        "bias_update_rate",
    )
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)
