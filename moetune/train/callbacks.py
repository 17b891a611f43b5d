"""Trainer callbacks of `MoETrainerMixin`: what happens once per optimizer step, and Ctrl-C.

`StepMonitor` (added by the mixin), at every optimizer step:
- with `skip_nonfinite=True`, a step in which any micro-batch had NaN/inf router logits, balance losses
  or loss (on any rank) is skipped: its gradients are dropped before `optimizer.step()` (set to None, so
  the optimizer moves nothing, not even its moments; under an fp16 GradScaler they are set to inf so
  the scaler skips the step), the expert bias is not moved and the routing statistics of the step are
  rolled back. The learning-rate schedule still advances, and the logged `grad_norm` of that step is
  the non-finite one measured before. Each skip is a warning in the logs; the count since the last
  log is logged as `moe/skipped_steps`;
- moves the aux-loss-free expert bias (`MoEModel.update_expert_bias`);
- warns once per expert, naming its layer, when an expert got no token (on any rank) for
  `dead_expert_steps` consecutive optimizer steps (skipped steps do not count). The streaks start
  from zero when a run is resumed.

`SaveOnInterrupt` (added by `moetune.app.run`, i.e. `moetune train`): the first Ctrl-C (SIGINT) lets the
current optimizer step finish, saves a complete checkpoint and stops training; the run then raises
`TrainingInterrupted`. A second Ctrl-C stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from moetune.core.stats import PER_RANK_BUFFERS, all_reduce_sum

if TYPE_CHECKING:
    from moetune.model import MoEModel

logger = logging.getLogger(__name__)


class StepMonitor(TrainerCallback):
    """Skipped non-finite steps, the expert-bias update and dead-expert warnings (module docstring)."""

    def __init__(self, get_model: Callable[[], MoEModel], has_scaler: Callable[[], bool]) -> None:
        self.get_model, self.has_scaler = get_model, has_scaler
        self.problem: str | None = None  # the first non-finite value seen in this step's micro-batches
        self.skipped = 0  # steps skipped since the last log
        self._start: list[dict[str, torch.Tensor]] | None = None  # per router: its buffers at step start
        self._skip = False
        self._counts: torch.Tensor | None = None  # this step's tokens per expert, all routers in a row
        self._idle: torch.Tensor | None = None  # consecutive steps without a token, per expert
        self._warned: torch.Tensor | None = None

    def flag_nonfinite(self, problem: str) -> None:
        """Called by the trainer for a micro-batch with NaN/inf: the step it belongs to is skipped."""
        if self.problem is None:
            self.problem = problem

    def _routers(self) -> list[tuple[str, Any]]:
        return [(name, layer.router) for name, layer in self.get_model().moe_layers()]

    def on_step_begin(self, args, state, control, **kwargs):
        self.problem, self._skip, self._counts = None, False, None
        cfg = self.get_model().moe_config
        if cfg.skip_nonfinite or cfg.dead_expert_steps > 0:
            routers = [router for _, router in self._routers()]
            self._start = [{buf: getattr(r, buf).clone() for buf in PER_RANK_BUFFERS} for r in routers]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._start is None:
            return
        routers = self._routers()
        watch = self.get_model().moe_config.dead_expert_steps > 0
        parts = [r.load_counts - s["load_counts"] for (_, r), s in zip(routers, self._start, strict=True)]
        device = parts[0].device if parts else None
        flag = torch.tensor([float(self.problem is not None)], dtype=torch.float64, device=device)
        reduced = all_reduce_sum(torch.cat([*parts, flag]) if watch else flag).cpu()
        self._skip = bool(reduced[-1] > 0)
        self._counts = reduced[:-1] if watch and not self._skip else None
        if self._skip:
            self._drop_gradients()
            for (_, router), saved in zip(routers, self._start, strict=True):
                for buf, value in saved.items():
                    getattr(router, buf).copy_(value)
            self.skipped += 1
            problem = self.problem or "non-finite values on another rank"
            logger.warning(
                "moetune: optimizer step %d skipped: %s (skip_nonfinite=True: its gradients are dropped, "
                "the expert bias stays)",
                state.global_step + 1,
                problem,
            )
        self._start = None

    def _drop_gradients(self) -> None:
        scaler = self.has_scaler()
        for p in self.get_model().parameters():
            if p.grad is not None:
                if scaler:  # GradScaler asserts it saw gradients; inf makes it skip the step itself
                    p.grad.fill_(float("inf"))
                else:
                    p.grad = None

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._skip:
            return
        self.get_model().update_expert_bias()
        if self._counts is not None:
            self._watch(self._counts, state.global_step + 1, state.is_world_process_zero)

    def _watch(self, counts: torch.Tensor, step: int, report: bool) -> None:
        routers = self._routers()
        limit = self.get_model().moe_config.dead_expert_steps
        if self._idle is None or self._idle.shape != counts.shape:
            self._idle = torch.zeros(counts.shape, dtype=torch.long)
            self._warned = torch.zeros(counts.shape, dtype=torch.bool)
        self._idle = torch.where(counts == 0, self._idle + 1, 0)
        new = (self._idle >= limit) & ~self._warned
        if not bool(new.any()):
            return
        self._warned |= new
        offsets = torch.tensor([0] + [r.num_experts for _, r in routers]).cumsum(0).tolist()
        for flat in new.nonzero().flatten().tolist():
            layer = next(i for i in range(len(routers)) if flat < offsets[i + 1])
            if report:
                logger.warning(
                    "moetune: expert %d of %s received no token for %d consecutive optimizer steps "
                    "(up to step %d): it is dead; consider aux_loss_coef or bias_update_rate",
                    flat - offsets[layer],
                    routers[layer][0],
                    limit,
                    step,
                )


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C; `checkpoint` is the last complete checkpoint (None: there is none)."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        super().__init__(f"training interrupted at step {step}")
        self.step, self.checkpoint = step, checkpoint


class SaveOnInterrupt(TrainerCallback):
    """First Ctrl-C: finish the optimizer step, save a checkpoint, stop. Use `installed()` around train()."""

    def __init__(self) -> None:
        self.interrupted = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The SIGINT handler while the block runs (signal handlers exist in the main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        print(
            "moetune: interrupted: saving a checkpoint after this optimizer step "
            "(Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.interrupted
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            stop = bool(all_reduce_sum(torch.tensor([float(stop)], device=args.device)).item() > 0)
        if stop:  # every rank stops at the same step
            self.interrupted = True
            control.should_save = True
            control.should_training_stop = True
