"""Tasks and the expert blocks they own: which experts a token may route among.

Every routed expert belongs to a task. The experts made at injection are block 0, owned by
`MoEConfig.task`; each `add_experts` appends a block owned by its new task; `extra_tasks` own none and
route among all experts. A task's index is its position in `MoEConfig.task_names()`. Restricting
tokens to tasks means routing among the union of their blocks, or among all blocks (None) when one of
them owns none. The model (`use_tasks`, `task_ids`), merging and export all ask these functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from moetune.config import MoEConfig

Blocks = tuple[int, ...] | None  # task blocks whose experts a token may use; None = every expert
# the tokens of one task in a batch: (its blocks, its task index, the indices of its samples (n,), or of
# its tokens (n,) in a packed row: `packed_groups`)
SampleGroup = tuple[Blocks, int, Tensor]


def task_index(config: MoEConfig, task: Any, where: str) -> int:
    """The index of `task`, given by name or by index; a ValueError naming the tasks otherwise."""
    names = config.task_names()
    if isinstance(task, str) and task in names:
        return names.index(task)
    if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < len(names):
        return task
    raise ValueError(
        f"{where}: unknown task {task!r}: tasks are {names} (by name, or by index 0..{len(names) - 1})"
    )


def blocks_of(config: MoEConfig, indices: Iterable[int]) -> Blocks:
    """The expert blocks the tasks at `indices` may route among: their own, or all (None) if one of
    them owns none."""
    owned = config.task_blocks()
    blocks = [owned[t] for t in indices]
    return None if None in blocks else tuple(sorted(set(blocks)))


def restriction(config: MoEConfig, tasks: str | Iterable[str], where: str) -> tuple[Blocks, int | None]:
    """(blocks, task index or None) for routing every token as `tasks` (names) route: the task index
    when one task is named. With task routing exactly one task, whose embedding the routers read."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError(f"{where}: no task given; tasks: {config.task_names()}")
    indices = sorted({task_index(config, name, where) for name in names})
    if config.task_routing != "none" and len(indices) > 1:
        raise ValueError(
            f"{where}: {names} names {len(indices)} tasks, but task_routing={config.task_routing!r} "
            "routes by the embedding of one task: name one"
        )
    return blocks_of(config, indices), indices[0] if len(indices) == 1 else None


def sample_groups(
    config: MoEConfig, task_ids: Tensor | Sequence[Any], batch: int | None
) -> list[SampleGroup]:
    """`task_ids` (one task per sample: a (B,) integer tensor, or names) checked and grouped by task."""
    if isinstance(task_ids, Tensor):
        if task_ids.dim() != 1 or task_ids.is_floating_point() or task_ids.dtype == torch.bool:
            raise ValueError(
                f"task_ids: expected an integer tensor of shape (batch,), got {task_ids.dtype} of "
                f"shape {tuple(task_ids.shape)}"
            )
        task_ids = task_ids.tolist()
    if not isinstance(task_ids, (list, tuple)) or not task_ids:
        raise ValueError(
            "task_ids: expected one task per sample (a (batch,) integer tensor or a list of task "
            f"names), got {task_ids!r}"
        )
    ids = [task_index(config, t, "task_ids") for t in task_ids]
    if batch is not None and len(ids) != batch:
        raise ValueError(f"task_ids: {len(ids)} tasks given for a batch of {batch} samples")
    samples: dict[int, list[int]] = {}
    for i, task in enumerate(ids):
        samples.setdefault(task, []).append(i)
    return [(blocks_of(config, [task]), task, torch.tensor(rows)) for task, rows in sorted(samples.items())]


def packed_examples(position_ids: Tensor | None, batch: int | None) -> int:
    """How many examples a padding-free batch packs into its one row (position ids restart at 0 for
    each: transformers' DataCollatorWithFlattening); 0 for any other batch."""
    if batch != 1 or position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return 0
    return int((position_ids[0] == 0).sum())


def packed_groups(
    config: MoEConfig, task_ids: Tensor | Sequence[Any], position_ids_1L: Tensor
) -> list[SampleGroup]:
    """`sample_groups` for a padding-free batch: one row of examples packed end to end, `task_ids` one
    task per example; each group's rows are the positions (n,) of its examples' tokens in the row."""
    starts_L = position_ids_1L[0] == 0
    if not bool(starts_L[0]):
        raise ValueError("task_ids with a packed row: its position ids must start at 0")
    examples = int(starts_L.sum())
    groups = sample_groups(config, task_ids, None)
    given = sum(rows.numel() for _, _, rows in groups)
    if given != examples:
        raise ValueError(
            f"task_ids: {given} tasks given for a packed row of {examples} examples (position ids "
            "restarting at 0 mark each example's start)"
        )
    example_L = torch.cumsum(starts_L.long(), 0) - 1  # (L,) the example each token belongs to
    return [
        (blocks, task, torch.isin(example_L, rows.to(example_L.device)).nonzero().flatten())
        for blocks, task, rows in groups
    ]
