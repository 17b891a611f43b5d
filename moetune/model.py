"""`MoEModel`: a frozen Hugging Face model with LoRA experts, its balance losses and its statistics."""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from moetune.config import MoEConfig
from moetune.core import balance, stats
from moetune.core import tasks as tasks_of
from moetune.core.checkpointing import AuxTap, tap_gradient
from moetune.core.context import ComputeOptions, RouterRecord, RoutingContext, token_mask_of
from moetune.core.injection import inject
from moetune.core.layers import (
    RoutedLayer,
    adapter_modules,
)
from moetune.core.merge import merge_into_base
from moetune.io.adapter import load_adapter, save_adapter


class MoEModel(nn.Module):
    """Wraps a transformers model whose targeted modules carry LoRA experts (see `get_moe_model`).

    `forward` takes the usual inputs, passes the padding mask to the MoE layers, and adds the
    weighted balance losses to `out.loss` when labels are given. Unknown attributes are looked up on
    the base model (`config`, `generate`, ...), as with peft's `PeftModel`.

    Tasks and continual learning (MoLE / MoE-LoRA continual learning: new experts per task, old ones
    frozen). Every routed expert belongs to a task: the experts created at injection to `MoEConfig.task`,
    each `add_experts(n, task=...)` block to its task (`tasks` lists them in order of creation; a task's
    index is its position). Routing is among all experts unless restricted: `with use_tasks(["A"]):` for
    every token, or `task_ids` per sample (`forward(..., task_ids=...)`, also `generate`). Restricted tokens
    route among the owners' experts alone (the other logits never enter the softmax: the owners'
    probabilities are those before the expansion), with k shrunk to the experts the tasks own; tasks that
    own no experts (`extra_tasks`) route among all of them. Shared experts and attention LoRA serve every
    task. With `task_routing` the routers also read the task's learned embedding (so every token needs a
    task). Guarantee: after `add_experts(..., freeze_existing=True)` and any training, `use_tasks([old])`
    gives the old task's outputs as before the expansion (the old experts are computed from their own
    blocks, on the same shapes; tested bitwise in float32).
    """

    # transformers' Trainer refuses to fine-tune a quantized model unless trainable adapters are attached
    # and it recognises them (peft's, or this flag); a MoEModel's experts are such adapters
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, config: MoEConfig, check_ffn: bool = True) -> None:
        super().__init__()
        self.base_model = model
        self.moe_config = config
        self._ctx = RoutingContext(ComputeOptions(contrastive_sample=config.contrastive_sample))
        self._aux: dict[str, Tensor] = {}
        # an inference forward's routing records (no autograd, no labels): its losses when asked
        self._pending: list[RouterRecord] | None = None
        # skip_nonfinite=True: what was NaN/inf in the last routed forward (None: all finite); for trainers
        self.nonfinite: str | None = None
        # False: out.loss is the task loss alone (MoETrainer adds the balance losses itself)
        self.balance_losses_in_output = True
        self._tap: AuxTap | None = None  # the last forward's, under reentrant activation checkpointing
        inject(model, config, self._ctx, check_ffn)
        for block in config.added_experts:  # an expanded adapter: the same blocks, frozen as they were
            self._append_block(block["num_experts"], block["freeze_existing"])

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Read by transformers' Trainer: whether forward takes `num_items_in_batch` (the base's answer)."""
        base = self.base_model
        if hasattr(base, "accepts_loss_kwargs"):
            return bool(base.accepts_loss_kwargs)
        params = inspect.signature(base.forward).parameters.values()
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        task_ids: Tensor | Sequence[str] | None = None,
        pixel_values: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward with MoE layers. `task_ids`: the task of each sample, a (B,) integer
        tensor of task indices (positions in `tasks`) or a list of B task names; each sample then routes
        among its task's experts alone (`use_tasks` is ignored for that forward), each task's samples
        routed as a batch of their own (balance losses are averaged over routers and these groups). In a
        padding-free batch (one row of examples packed end to end, position ids restarting at 0 for each)
        `task_ids` gives the task of each packed example."""
        batch = next((v.shape[0] for v in (input_ids, inputs_embeds) if v is not None and v.dim() >= 2), None)
        packed = task_ids is not None and tasks_of.packed_examples(position_ids, batch) > 1
        if task_ids is None:
            sample_tasks = None
        elif packed:
            sample_tasks = tasks_of.packed_groups(self.moe_config, task_ids, position_ids)
        else:
            sample_tasks = tasks_of.sample_groups(self.moe_config, task_ids, batch)
        named = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            pixel_values=pixel_values,
            token_type_ids=token_type_ids,
        )
        inputs = {k: v for k, v in named.items() if v is not None} | kwargs
        ctx, state = self._ctx, self._ctx.state
        # transformers never gives an MLP the attention mask: the layers read it from the context
        state.token_mask = token_mask_of(attention_mask)
        ctx.records = []
        cfg = self.moe_config
        state.want_expert_outputs = self.training and cfg.contrastive_loss_coef > 0 and state.adapter_enabled
        state.sample_tasks, state.packed = sample_tasks, packed
        # for checkpointed recomputation: only a forward with autograd can be re-run by a backward, so a
        # forward without (DPO's reference pass under disable_adapter, evaluation) between a forward and
        # its backward leaves the state that backward replays alone
        recordable = torch.is_grad_enabled()
        if recordable:
            ctx.remember()
        try:
            out = self.base_model(**inputs)
            records = ctx.records
        finally:
            ctx.records = None
            state.token_mask, state.want_expert_outputs, state.sample_tasks = None, False, None
            state.packed = False
        self._tap = None
        if records:  # (a forward without routers, e.g. under disable_adapter, leaves `nonfinite` as it was)
            self._tap = self._tap_if_detached(records)
            if recordable:
                ctx.replay.aux_tap = self._tap
            self.nonfinite = None
            if torch.is_grad_enabled() or labels is not None:
                losses_R = balance.per_router(records, self.moe_config)
                self._check_finite(records, losses_R)
                self._aux, self._pending = balance.mean_over_routers(losses_R), None
            else:  # inference (generation too): nothing needs the losses unless `aux_losses` asks
                self._check_finite(records, {})
                self._aux, self._pending = {}, records
            if (
                self.balance_losses_in_output
                and labels is not None
                and getattr(out, "loss", None) is not None
            ):
                out.loss = out.loss + self.weighted_aux_loss()
        return out

    def _tap_if_detached(self, records: list[RouterRecord]) -> AuxTap | None:
        """Reentrant activation checkpointing runs the first forward without autograd, so its balance
        losses have no graph: the layers then recompute theirs in backward and attach them to their
        outputs (moetune.core.checkpointing), each router's share weighted as in `weighted_aux_loss`."""
        if all(r.grad_enabled for r in records) or not (self.training and torch.is_grad_enabled()):
            return None
        with_contrastive = records[0].expert_outputs is not None
        cfg = self.moe_config

        def loss_of(record: RouterRecord) -> Tensor:
            terms = balance.weighted_terms(balance.router_losses(record, cfg, with_contrastive), cfg)
            return torch.stack(terms).sum() / len(records) if terms else record.routing.logits.new_zeros(())

        return AuxTap(loss_of)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, **options: Any
    ) -> None:
        """transformers' activation checkpointing, non-reentrant unless asked otherwise (`options`, e.g.
        `every_n_layers`, go to the base model). The reentrant variant back-propagates a block only
        through its inputs: they are made to require grad (the embeddings' output), and the balance
        losses reach the routers through `moetune.core.checkpointing`. transformers before 5.x names it
        `gradient_checkpointing_enable`, which is called there."""
        kwargs = {"use_reentrant": False} | (activation_checkpointing_kwargs or {})
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)
        if kwargs["use_reentrant"]:
            base.enable_input_require_grads()

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, **options: Any
    ) -> None:
        """The older name of `activation_checkpointing_enable` (transformers deprecates it for v6)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    def activation_checkpointing_disable(self) -> None:
        base = self.base_model
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()

    def gradient_checkpointing_disable(self) -> None:
        """The older name of `activation_checkpointing_disable`."""
        self.activation_checkpointing_disable()

    def _check_finite(self, records: list[RouterRecord], losses_R: dict[str, Tensor]) -> None:
        """NaN/inf in the last forward's routing: a FloatingPointError naming the first such layer, or
        with `skip_nonfinite` the problem kept in `self.nonfinite` (trainers skip the step)."""
        routers = dict(self.moe_layers())
        cfg = self.moe_config
        problem = balance.nonfinite_problem(records, losses_R, lambda n: routers[n].router, cfg.router_dtype)
        if problem is None:
            return
        if cfg.skip_nonfinite:
            self.nonfinite = problem
            return
        raise FloatingPointError(f"{problem} (set skip_nonfinite=True to skip such steps instead)")

    def weighted_aux_loss(self) -> Tensor:
        """sum_l coef_l * loss_l of the last forward (what `out.loss` adds). After a forward that routed
        without autograd (reentrant checkpointing) its gradient is handed to the layers' recomputed
        losses in backward (moetune.core.checkpointing)."""
        aux = self.aux_losses()
        terms = balance.weighted_terms(aux, self.moe_config)
        if terms:
            total = torch.stack(terms).sum()
            return total if self._tap is None else tap_gradient(total, self._tap)
        device = next(iter(aux.values())).device if aux else None
        return torch.zeros((), device=device)

    def aux_losses(self) -> dict[str, Tensor]:
        """Balance losses of the last forward (unweighted, averaged over routers). After an inference
        forward (no autograd, no labels) they are computed here, on first asking."""
        if self._pending is not None:
            self._aux, self._pending = (
                balance.mean_over_routers(balance.per_router(self._pending, self.moe_config)),
                None,
            )
        return dict(self._aux)

    # ---- the moetune modules ---------------------------------------------------------------------
    def moe_layers(self) -> Iterator[tuple[str, RoutedLayer]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, RoutedLayer):
                yield name, module

    def adapter_modules(self) -> Iterator[tuple[str, nn.Module]]:
        yield from adapter_modules(self.base_model)

    def routing_stats(self) -> dict[str, dict[str, Any]]:
        """Per MoE layer since the last reset: tokens per expert, load CV, router entropy, dead experts,
        and `tokens_per_expert_by_task`: task name -> tokens per expert (all experts) of the tokens routed
        for that task alone (`use_tasks` with one task, or `task_ids`); tasks without such tokens omitted."""
        return {
            name: stats.summarize(layer.router)
            | {"tokens_per_expert_by_task": stats.by_task(layer.router, self.tasks)}
            for name, layer in self.moe_layers()
        }

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Read by torch's `DistributedDataParallel` when it wraps this model: buffers it must leave alone.

        DDP copies rank 0's buffers to every rank before a forward (`broadcast_buffers`, on by default).
        The routers' running counts are per-rank partial sums that `stats.all_reduce_sum` adds up, so
        that copy would count rank 0's tokens twice and lose the others'. The expert bias stays
        broadcast: it is identical on every rank (updated from all-reduced counts).
        """
        return [
            f"base_model.{name}.router.{buf}"
            for name, _ in self.moe_layers()
            for buf in stats.PER_RANK_BUFFERS
        ]

    # ---- tasks -------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """The tasks that own experts, in order of creation (a task's index in `task_ids`)."""
        return self.moe_config.task_names()

    def add_experts(self, n: int, task: str, freeze_existing: bool = True) -> None:
        """Append a block of n routed experts owned by `task` to every MoE layer (LoRA A Kaiming-uniform,
        B zero, new router rows, zero bias entries): the model's outputs do not change until they train.

        freeze_existing=True: everything trained so far keeps its values — every parameter of the model
        (old experts, old router rows, shared experts, attention LoRA, modules_to_save) is frozen
        (requires_grad False, gradients dropped), the old bias entries no longer move
        (`update_expert_bias`), and only the new experts and their router rows train. The block is
        recorded in `moe_config.added_experts`, so that `save_pretrained` / `from_pretrained` rebuild it.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"add_experts: n={n!r}: must be an int >= 1 (the number of new experts)")
        if not isinstance(task, str) or not task:
            raise ValueError(f"add_experts: task={task!r}: must be a non-empty task name")
        if task in self.tasks:
            raise ValueError(
                f"add_experts: task {task!r} exists already (tasks: {self.tasks}): name a new task"
            )
        if not isinstance(freeze_existing, bool):
            raise ValueError(f"add_experts: freeze_existing={freeze_existing!r}: must be True or False")
        self._append_block(n, freeze_existing)
        record = {"task": task, "num_experts": n, "freeze_existing": freeze_existing}
        self.moe_config = copy.copy(self.moe_config)  # the caller's config object stays as it was
        self.moe_config.added_experts = [*self.moe_config.added_experts, record]

    def _append_block(self, n: int, freeze_existing: bool) -> None:
        if freeze_existing:
            for p in self.parameters():
                p.requires_grad_(False)
                p.grad = None  # an optimizer holding it skips it (no weight decay on a frozen weight)
        for _, layer in self.moe_layers():
            layer.add_experts(n)

    @contextmanager
    def use_tasks(self, tasks: str | Iterable[str]) -> Iterator[None]:
        """Route every token among the experts of `tasks` (names) alone, e.g. an old task's own experts.
        A task that owns no experts (`extra_tasks`) routes among all of them. With task routing, name one
        task: the routers read its embedding."""
        blocks, task = tasks_of.restriction(self.moe_config, tasks, "use_tasks")
        with (
            self._context_set(self._ctx.state, "tasks", blocks),
            self._context_set(self._ctx.state, "task", task),
        ):
            yield

    def reset_routing_stats(self) -> None:
        for _, layer in self.moe_layers():
            stats.reset(layer.router)

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing, once per optimizer step (`moetune.core.balance.update_expert_bias`)."""
        rate = self.moe_config.bias_update_rate
        if rate <= 0:
            return
        for _, layer in self.moe_layers():
            balance.update_expert_bias(layer.router, rate)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The frozen base model alone (e.g. the reference model of DPO), without a copy."""
        with self._context_set(self._ctx.state, "adapter_enabled", False):
            yield

    @contextmanager
    def reference_path(self) -> Iterator[None]:
        """Compute experts with the slow per-expert loop (the tested truth of the fast path)."""
        with self._context_set(self._ctx.options, "reference", True):
            yield

    @contextmanager
    def _context_set(self, part: object, field: str, value: Any) -> Iterator[None]:
        previous = getattr(part, field)
        setattr(part, field, value)
        try:
            yield
        finally:
            setattr(part, field, previous)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def merge_and_unload(self, task: str | Sequence[str] | None = None) -> nn.Module:
        """Merge the adapter into the base weights and return the plain base model (peft's name), where
        every layer's mixture is the same for every token (`task`: as under `use_tasks(task)`); otherwise
        a `moetune.core.merge.MergeError` naming the layer, the model unchanged. See `moetune.core.merge`."""
        if task is not None:  # the model's own task -> expert blocks mapping, as for a forward
            with self.use_tasks(task):
                return self.merge_and_unload()
        return merge_into_base(self.base_model, self._ctx.state.tasks, self._ctx.state.task)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = {id(p): p for p in self.parameters()}.values()  # tied weights count once
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def generate(self, *args: Any, task_ids: Tensor | Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's `generate`; routing statistics skip the prompt's padding (left padding).
        `task_ids` as in `forward` (one per sequence generated)."""
        state = self._ctx.state
        state.token_mask = token_mask_of(kwargs.get("attention_mask"))
        state.sample_tasks = (
            None if task_ids is None else tasks_of.sample_groups(self.moe_config, task_ids, None)
        )
        try:
            return self.base_model.generate(*args, **kwargs)
        finally:
            state.token_mask, state.sample_tasks = None, None

    # ---- saving ----------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool = True, **_: Any
    ) -> None:
        """Adapter only: `moetune_config.json` and `moetune_model.safetensors`. A model sharded by FSDP2 or
        DeepSpeed ZeRO-3 is gathered first: every rank must call this; those with `is_main_process`
        (transformers' name) write the files."""
        save_adapter(self, save_directory, write=is_main_process)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, path: str | os.PathLike, is_trainable: bool = False, strict: bool = False
    ) -> MoEModel:
        """Inject the saved adapter into `model` and load its weights (frozen unless is_trainable).

        Checksums, tensor names and shapes are verified. A base whose fingerprint differs from the one
        the adapter was trained on (`moetune.io.provenance`) warns; with `strict=True` it is an error
        (`BaseMismatchError`), as is an adapter that records no fingerprint.
        """
        return load_adapter(cls, model, path, is_trainable=is_trainable, strict=strict)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)


def get_moe_model(model: nn.Module, config: MoEConfig | None = None, *, check_ffn: bool = True) -> MoEModel:
    """Inject LoRA experts into `model` in place, freeze its weights, and wrap it in a `MoEModel`.

    `check_ffn`: every feed-forward block taken for an `ffn` layer is first run on a small random input
    both ways (its own forward, and moetune's decomposition with no expert); one that computes
    something else is refused with a ValueError naming it. Turn off only for a block known to be right
    whose check cannot run (e.g. a forward with required extra inputs).
    """
    return MoEModel(model, config or MoEConfig(), check_ffn)
