"""Training with transformers' Trainer (and TRL's trainers): `MoETrainerMixin` / `MoETrainer`.

What the mixin adds to a Trainer:
- the balance losses, added in `compute_loss` after the Trainer's own loss, so label smoothing and a
  custom `compute_loss_func` keep them, and scaled like one micro-batch mean per optimizer step:
  when the Trainer does not divide the loss by the accumulation steps (the model takes
  `num_items_in_batch`), the mixin divides the balance losses itself; they are never multiplied by the
  world size (they are per-rank micro-batch means, as in Switch and transformers; DDP averages them);
- the aux-loss-free bias update once per optimizer step, steps with NaN/inf skipped when the config's
  `skip_nonfinite` is set (else a FloatingPointError naming the layer, or the loss), and warnings for
  experts without a token for `dead_expert_steps` optimizer steps (`moetune.train.callbacks.StepMonitor`);
- the routers in their own optimizer group: learning rate x `router_lr_multiplier`, no weight decay;
- router metrics in the logs: each balance loss, mean load CV and dead experts since the last log
  (means over all ranks);
- checkpoints that hold the adapter only (+ optimizer, scheduler, RNG state), and resume from them;
  a checkpoint counts only once complete (`moetune.train.checkpoints`: a marker written after every other
  file is on disk); `resume_from_checkpoint=True` takes the last complete one, older checkpoints are
  rotated away (`save_total_limit`) only after the new one is complete.

Data parallelism (DDP through torchrun or accelerate), per rank and global:
- the task loss is the Trainer's: with `average_tokens_across_devices=True` (the default) the token
  mean over the global batch, so N ranks x b rows train like one process on N*b rows;
- the balance losses are per rank: each rank computes them on its own micro-batch and DDP averages the
  gradients, so training minimises the mean of the per-rank losses, not the loss of the global batch
  (the Switch loss is not linear in the tokens). N ranks x b rows equal one process with micro-batches
  of b rows accumulated over N steps, not one process with N*b rows;
- routing statistics, the counts of the aux-loss-free bias update and the logged balance losses are
  all-reduced: every rank reports the same numbers and keeps the same expert bias. DDP's per-forward
  buffer broadcast skips the routers' running counts (`MoEModel._ddp_params_and_buffers_to_ignore`).
Tested with 2 processes (gloo, CPU) in tests/test_distributed.py.

FSDP and DeepSpeed: `save_model` (checkpoints included) gathers the adapter alone on every rank and the
main process writes it, instead of the Trainer's whole-model state dict (or ZeRO-3's empty shards);
resuming under FSDP2 loads the adapter into each rank's shards. DeepSpeed resumes from its own
checkpoint (`global_step*/`). Tested under ZeRO-2/3 with 2 CPU processes in tests/test_deepspeed.py.

Use `MoETrainer` as a drop-in Trainer, or mix into TRL: `class MoESFTTrainer(MoETrainerMixin, SFTTrainer)`.
For DPO use `moetune.train.dpo.MoEDPOTrainer` (needs `trl`): its reference model is the frozen base, obtained
by running the policy inside `disable_adapter()` (`DisabledAdapterReference`), never a copy of the base:

    from moetune.train.dpo import MoEDPOTrainer
    trainer = MoEDPOTrainer(model=moe_model, args=trl.DPOConfig(...), train_dataset=pairs,
                            processing_class=tokenizer)
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from moetune.core.stats import PER_RANK_BUFFERS, all_reduce_sum
from moetune.io.adapter import load_adapter_weights
from moetune.model import MoEModel
from moetune.train import checkpoints
from moetune.train.callbacks import StepMonitor

TRAINING_ARGS_NAME = "training_args.bin"


def unwrap_moe(model: nn.Module) -> MoEModel:
    """The MoEModel inside DDP/accelerate/compile wrappers."""
    seen = model
    while not isinstance(seen, MoEModel):
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a moetune MoEModel (from get_moe_model), got {type(model).__name__}")
        seen = inner
    return seen


class DisabledAdapterReference(nn.Module):
    """A reference model (DPO's pi_ref) that is the policy with every adapter off: no copy of the base.

    The policy is kept as a plain attribute, not a submodule, so what a trainer does to its reference
    model (`.to()`, `.eval()`, dropout changes, `state_dict()`) leaves the policy alone; the view has no
    parameters of its own. Calling it runs `policy(...)` inside `policy.disable_adapter()`.
    """

    policy: MoEModel

    def __init__(self, policy: MoEModel) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)  # not registered: nn.Module.__setattr__ would

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)


@contextmanager
def _fused_head_on_base_model(trainer_cls: type) -> Iterator[None]:
    """TRL's trainers patch a fused LM head onto the model they train, or onto a peft model's base model.

    For a MoEModel the head belongs on the wrapped transformers model too (our forward passes
    `fused_lm_head` through), so during the trainer's __init__ TRL's helper is pointed there; a
    `DisabledAdapterReference` is left as it is (it calls the policy, which has the head).
    """
    modules = {sys.modules[c.__module__] for c in trainer_cls.__mro__ if c.__module__ in sys.modules}
    patched = [(m, m.add_fused_lm_head) for m in modules if callable(getattr(m, "add_fused_lm_head", None))]
    for module, original in patched:

        def redirected(model, *args, _original=original, **kwargs):
            if isinstance(model, DisabledAdapterReference):
                return None  # it calls the policy, whose base model gets the head
            target = model.get_base_model() if isinstance(model, MoEModel) else model
            return _original(target, *args, **kwargs)

        module.add_fused_lm_head = redirected
    try:
        yield
    finally:
        for module, original in patched:
            module.add_fused_lm_head = original


class _LabelSmootherShift:
    """The Trainer's label smoother, shifting labels iff the wrapped base model is a causal LM."""

    def __init__(self, smoother, causal: bool) -> None:
        self.smoother, self.causal = smoother, causal

    def __call__(self, outputs, labels, shift_labels: bool = False, **kwargs):
        return self.smoother(outputs, labels, shift_labels=self.causal, **kwargs)


class MoETrainerMixin:
    """Mix into a `transformers.Trainer` subclass (first in the bases); see the module docstring."""

    def __init__(self, *args: Any, router_lr_multiplier: float = 1.0, **kwargs: Any) -> None:
        if router_lr_multiplier <= 0:
            raise ValueError(f"router_lr_multiplier={router_lr_multiplier}: must be > 0")
        self.router_lr_multiplier = router_lr_multiplier
        with _fused_head_on_base_model(type(self)):
            super().__init__(*args, **kwargs)
        moe = unwrap_moe(self.model)  # fail early on a model without experts
        self.step_monitor = StepMonitor(
            lambda: unwrap_moe(self.model), lambda: getattr(self.accelerator, "scaler", None) is not None
        )
        self.add_callback(self.step_monitor)
        if self.label_smoother is not None:
            # The Trainer decides whether to shift labels from the model's class name, which is ours.
            causal = type(moe.base_model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
            self.label_smoother = _LabelSmootherShift(self.label_smoother, causal)
        self._aux_sums: dict[str, float] = defaultdict(float)
        self._aux_count = 0

    # ---- loss --------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        moe = unwrap_moe(model)
        moe.balance_losses_in_output = False
        try:  # return_outputs as asked: TRL's fused LM head runs an extra forward to build outputs
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        finally:
            moe.balance_losses_in_output = True
        loss, outputs = result if return_outputs else (result, None)
        finite = not model.training or self._check_finite(moe, loss)
        if moe.aux_losses():
            balance = moe.weighted_aux_loss()
            if model.training:
                if finite:
                    self._remember(moe)
                if self._task_loss_is_scaled_for_ga(num_items_in_batch):
                    balance = balance / self.current_gradient_accumulation_steps
            loss = loss + balance.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _check_finite(self, moe: MoEModel, loss: torch.Tensor) -> bool:
        """False when this training micro-batch had NaN/inf (its step will be skipped, `skip_nonfinite`).

        NaN/inf in router logits or balance losses raised in the forward unless `skip_nonfinite`; a
        non-finite task loss with finite routers raises here, naming the step.
        """
        problem = moe.nonfinite
        if problem is None and not bool(torch.isfinite(loss.detach()).all()):
            problem = f"non-finite loss ({float(loss.detach().float().sum())}) with finite router logits"
            if not moe.moe_config.skip_nonfinite:
                raise FloatingPointError(
                    f"{problem} at optimizer step {self.state.global_step + 1} "
                    "(set skip_nonfinite=True to skip such steps instead)"
                )
        if problem is not None:
            self.step_monitor.flag_nonfinite(problem)
        return problem is None

    def _task_loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Mirror of Trainer.training_step: is the loss already normalised over the accumulated batch?"""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
            or self.compute_loss_func is not None
        )

    def _remember(self, moe: MoEModel) -> None:
        for name, value in moe.aux_losses().items():
            self._aux_sums[name] += float(value.detach())
        self._aux_count += 1

    # ---- optimizer ---------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        routers = {
            id(p) for _, layer in unwrap_moe(opt_model).moe_layers() for p in layer.router.parameters()
        }
        groups: dict[str, dict[str, Any]] = {
            "decay": {"params": [], "weight_decay": self.args.weight_decay},
            "no_decay": {"params": [], "weight_decay": 0.0},
            "router": {
                "params": [],
                "weight_decay": 0.0,
                "lr": self.args.learning_rate * self.router_lr_multiplier,
            },
        }
        for name, p in opt_model.named_parameters():
            if p.requires_grad:
                key = "router" if id(p) in routers else "decay" if name in decay else "no_decay"
                groups[key]["params"].append(p)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls([g for g in groups.values() if g["params"]], **optimizer_kwargs)
        return self.optimizer

    # ---- evaluation --------------------------------------------------------------------------------
    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """The Trainer's evaluation, with each dataset's routing (`<prefix>_moe/effective_experts`,
        `..._effective_load`, `..._load_cv`) kept apart from the training's routing statistics; for a dict
        of datasets (one per task) also `<prefix>_loss`, the mean of their losses, which the Trainer's
        default `metric_for_best_model` reads."""
        datasets = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(datasets, dict):
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            losses = [metrics.get(f"{metric_key_prefix}_{name}_loss") for name in datasets]
            if f"{metric_key_prefix}_loss" not in metrics and losses and None not in losses:
                mean = {f"{metric_key_prefix}_loss": sum(losses) / len(losses)}
                metrics.update(mean)
                super().log(mean)
            return metrics
        moe = unwrap_moe(self.model)
        saved = {
            (name, buf): getattr(layer.router, buf).clone()
            for name, layer in moe.moe_layers()
            for buf in PER_RANK_BUFFERS
        }
        moe.reset_routing_stats()
        self._eval_prefix = metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._eval_prefix = None
            layers = dict(moe.moe_layers())
            for (name, buf), value in saved.items():  # the training's statistics, as they were
                getattr(layers[name].router, buf).copy_(value)

    def _routing_metrics(self, prefix: str) -> dict[str, float]:
        layer_stats = list(unwrap_moe(self.model).routing_stats().values())
        if not layer_stats or not layer_stats[0]["tokens"]:
            return {}
        n = len(layer_stats)
        metrics = {f"{prefix}moe/load_cv": round(sum(s["load_cv"] for s in layer_stats) / n, 4)}
        metrics[f"{prefix}moe/dead_experts"] = sum(len(s["dead_experts"]) for s in layer_stats)
        for key in ("effective_experts", "effective_load"):  # averaged over layers
            metrics[f"{prefix}moe/{key}"] = round(sum(s[key] for s in layer_stats) / n, 4)
        return metrics

    # ---- logs --------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        prefix = getattr(self, "_eval_prefix", None)
        if prefix is not None and f"{prefix}_loss" in logs:  # an evaluation's metrics (the dict returned)
            logs.update(self._routing_metrics(f"{prefix}_"))
        if self._aux_count and "loss" in logs:
            # every rank logs (the Trainer gathers its loss too): the mean over all ranks' micro-batches
            sums = torch.tensor([*self._aux_sums.values(), self._aux_count], dtype=torch.float64)
            *totals, count = all_reduce_sum(sums).tolist()
            for name, total in zip(self._aux_sums, totals, strict=True):
                logs[f"moe/{name}"] = round(total / count, 6)
            self._aux_sums.clear()
            self._aux_count = 0
            moe = unwrap_moe(self.model)
            logs.update(self._routing_metrics(""))
            moe.reset_routing_stats()
            if moe.moe_config.skip_nonfinite:
                logs["moe/skipped_steps"] = self.step_monitor.skipped  # since the last log
                self.step_monitor.skipped = 0
        super().log(logs, *args, **kwargs)

    # ---- checkpoints -------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Trainer.train; `resume_from_checkpoint=True` takes the last *complete* checkpoint, and an
        explicit checkpoint must be complete (`moetune.train.checkpoints`)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = checkpoints.last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"{self.args.output_dir}: no complete checkpoint to resume from")
        elif resume_from_checkpoint and not checkpoints.is_complete(resume_from_checkpoint):
            parent = os.path.dirname(os.path.abspath(resume_from_checkpoint))
            last = checkpoints.last_complete_checkpoint(parent)
            raise ValueError(
                f"{resume_from_checkpoint}: not a complete moetune checkpoint (no valid "
                f"{checkpoints.MARKER}: it was being written when training stopped); the last complete "
                f"one there is {last}"
            )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The Trainer's checkpoint, then the completion marker, then the rotation of old checkpoints."""
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            checkpoints.clear_for_rewrite(folder)
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # the Trainer would rotate before the marker exists
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states) are written
        if self.args.should_save:
            checkpoints.mark_complete(folder, self.state.global_step)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP or DeepSpeed the Trainer would gather the whole model (base included) to rank 0,
        or with ZeRO-3 (without `stage3_gather_16bit_weights_on_model_save`) save its empty shards: the
        adapter alone is gathered instead, on every rank (a collective), and the main process writes it."""
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            super().save_model(output_dir, _internal_call)
            return
        self._save(output_dir, sharded=True)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(
        self, output_dir: str | None = None, state_dict: dict | None = None, sharded: bool = False
    ) -> None:
        """The adapter (+ tokenizer, training args); `sharded`: every rank calls it (see `save_model`)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not (self.args.should_save or sharded):
            return
        unwrap_moe(self.model).save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_adapter_weights(unwrap_moe(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter_weights(unwrap_moe(self.model), self.state.best_model_checkpoint)


class MoETrainer(MoETrainerMixin, Trainer):
    """transformers.Trainer for a moetune `MoEModel` (see `MoETrainerMixin`)."""
