"""PNG plots of routing: the share of tokens each expert receives, per layer (and per task)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def load_matrix(stats: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], np.ndarray]:
    """(layer names, (L, E) share of routed slots per expert); rows padded with NaN for fewer experts."""
    names = list(stats)
    width = max(len(s["tokens_per_expert"]) for s in stats.values())
    share = np.full((len(names), width), np.nan)
    for i, s in enumerate(stats.values()):
        counts = np.asarray(s["tokens_per_expert"], dtype=float)
        share[i, : len(counts)] = counts / max(counts.sum(), 1.0)
    return names, share


def _short(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-3:]) if len(parts) > 3 else name


def plot_routing(
    stats_by_group: Mapping[str, Mapping[str, Mapping[str, Any]]],
    path: str | os.PathLike,
    title: str = "Expert load (share of routed slots)",
) -> None:
    """One heatmap per group (e.g. per task, or a single "all"), layers x experts."""
    groups = list(stats_by_group)
    fig, axes = plt.subplots(
        1, len(groups), figsize=(3.2 + 2.8 * len(groups), 0.35 * _rows(stats_by_group) + 2), squeeze=False
    )
    image = None
    for ax, group in zip(axes[0], groups, strict=True):
        names, share = load_matrix(stats_by_group[group])
        E = share.shape[1]
        image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=min(1.0, 3.0 / E))
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(E))
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([_short(n) for n in names] if ax is axes[0][0] else [], fontsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of slots")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _rows(stats_by_group: Mapping[str, Mapping[str, Any]]) -> int:
    return max(len(s) for s in stats_by_group.values())


def plot_task_expert(task_share: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Task x expert heatmap of the share of slots, averaged over layers."""
    tasks = list(task_share)
    matrix = np.stack([np.nanmean(task_share[t], axis=0) for t in tasks])
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * matrix.shape[1], 1 + 0.5 * len(tasks)))
    image = ax.imshow(matrix, aspect="auto", cmap="magma")
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks)
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax, label="share of slots (mean over layers)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
