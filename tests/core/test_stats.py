"""Routing statistics computed by hand: the task-expert mutual information."""

from __future__ import annotations

import math

import pytest
import torch

from moetune.core.stats import task_information


def per_task(counts: dict[str, list[list[int]]]) -> dict[str, dict[str, dict]]:
    """task -> layer -> the `tokens_per_expert` entry `routing_stats()` gives (the rest unused)."""
    return {
        task: {f"layer{i}": {"tokens_per_expert": row} for i, row in enumerate(rows)}
        for task, rows in counts.items()
    }


def test_task_information_by_hand() -> None:
    # layer0: each task its own expert (1 bit); layer1: both tasks alike (0 bits);
    # layer2: 3/8 1/8 / 1/8 3/8 -> 2 (3/8) log2(3/2) + 2 (1/8) log2(1/2) = 0.75 log2 1.5 - 0.25
    got = task_information(per_task({"a": [[10, 0], [5, 5], [3, 1]], "b": [[0, 10], [4, 4], [1, 3]]}))
    assert got["layer0"] == pytest.approx(1.0, abs=1e-12)
    assert got["layer1"] == pytest.approx(0.0, abs=1e-12)
    assert got["layer2"] == pytest.approx(0.75 * math.log2(1.5) - 0.25, abs=1e-12)


def test_task_information_bounds_and_symmetry() -> None:
    """0 <= I <= min(log2 tasks, log2 E); the same under a relabelling of the experts; nan for a layer
    that routed nothing."""
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 50, (3, 4, 6), generator=g)  # tasks, layers, experts
    groups = per_task({t: counts[i].tolist() for i, t in enumerate("abc")})
    got = task_information(groups)
    assert all(0.0 <= v <= math.log2(3) + 1e-12 for v in got.values())
    shuffled = per_task({t: counts[i][:, [5, 3, 1, 0, 2, 4]].tolist() for i, t in enumerate("abc")})
    assert task_information(shuffled) == pytest.approx(got, abs=1e-12)
    empty = task_information(per_task({"a": [[0, 0]], "b": [[0, 0]]}))
    assert math.isnan(empty["layer0"])
