"""`MoEModel`: a frozen Hugging Face model with LoRA experts, its balance losses and its statistics."""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from moetune import losses, stats
from moetune.config import MoEConfig
from moetune.injection import inject
from moetune.layers import LoRALinear, RoutedLayer, RouterRecord, RoutingContext, TrainableCopy

ADAPTER_MODULES = (RoutedLayer, LoRALinear, TrainableCopy)


class MoEModel(nn.Module):
    """Wraps a transformers model whose targeted modules carry LoRA experts (see `get_moe_model`).

    `forward` takes the usual inputs, passes the padding mask to the MoE layers, and adds the
    weighted balance losses to `out.loss` when labels are given. Unknown attributes are looked up on
    the base model (`config`, `generate`, ...), as with peft's `PeftModel`.
    """

    def __init__(self, model: nn.Module, config: MoEConfig) -> None:
        super().__init__()
        self.base_model = model
        self.moe_config = config
        self._ctx = RoutingContext(contrastive_sample=config.contrastive_sample)
        self._aux: dict[str, Tensor] = {}
        # skip_nonfinite=True: what was NaN/inf in the last routed forward (None: all finite); for trainers
        self.nonfinite: str | None = None
        # False: out.loss is the task loss alone (MoETrainer adds the balance losses itself)
        self.balance_losses_in_output = True
        inject(model, config, self._ctx)

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
        task_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if task_ids is not None:
            raise NotImplementedError("task_ids: task-restricted routing is not available yet")
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
        ctx = self._ctx
        # transformers never gives an MLP the attention mask: the layers read it from the context.
        # Padding-free batches (position_ids, no attention_mask) hold no padding: every token is real.
        ctx.token_mask = (
            attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        )
        ctx.records = []
        cfg = self.moe_config
        ctx.want_expert_outputs = self.training and cfg.contrastive_loss_coef > 0 and ctx.adapter_enabled
        try:
            out = self.base_model(**inputs)
            records = ctx.records
        finally:
            ctx.token_mask, ctx.records, ctx.want_expert_outputs = None, None, False
        if records:  # (a forward without routers, e.g. under disable_adapter, leaves `nonfinite` as it was)
            self.nonfinite = None
            per_router = self._balance_losses(records)
            self._check_finite(records, per_router)
            self._aux = {name: values.mean() for name, values in per_router.items()}
            if (
                self.balance_losses_in_output
                and labels is not None
                and getattr(out, "loss", None) is not None
            ):
                out.loss = out.loss + self.weighted_aux_loss()
        return out

    def _balance_losses(self, records: list[RouterRecord]) -> dict[str, Tensor]:
        """Each loss per router: name -> (R,) in the order of `records` (averaged over routers, SPEC §3)."""
        cfg = self.moe_config
        per_router: dict[str, list[Tensor]] = {"aux_loss": [], "z_loss": [], "importance_loss": []}
        if cfg.contrastive_loss_coef > 0 and records[0].expert_outputs is not None:
            per_router["contrastive_loss"] = []
        for rec in records:
            r = rec.routing
            per_router["aux_loss"].append(
                losses.switch_aux_loss(r.logits, cfg.top_k, mask=rec.mask, selected=r.assignment())
            )
            per_router["z_loss"].append(losses.z_loss(r.logits, mask=rec.mask))
            per_router["importance_loss"].append(
                losses.importance_loss(r.logits, mask=rec.mask, gates=r.dense_weights())
            )
            if "contrastive_loss" in per_router:
                per_router["contrastive_loss"].append(
                    losses.contrastive_loss(
                        rec.expert_outputs,
                        rec.sample_active,
                        mode=cfg.contrastive_mode,
                        temperature=cfg.contrastive_temperature,
                    )
                )
        return {name: torch.stack(vals) for name, vals in per_router.items()}

    def _check_finite(self, records: list[RouterRecord], per_router: dict[str, Tensor]) -> None:
        """NaN/inf in a router's logits (real tokens only) or its balance losses: a FloatingPointError
        naming the first such layer, or with `skip_nonfinite` the problem kept in `self.nonfinite`."""
        logits_ok_R = torch.stack([(r.routing.logits.isfinite().all(-1) | ~r.mask).all() for r in records])
        losses_ok_LR = torch.stack([values.isfinite() for values in per_router.values()])
        ok_R = logits_ok_R & losses_ok_LR.all(0)
        if bool(ok_R.all()):
            return
        i = int((~ok_R).nonzero()[0, 0])
        if not logits_ok_R[i]:
            problem = f"non-finite router logits in {records[i].name}: the input to this layer holds NaN/inf"
        else:
            bad = [name for name, ok in zip(per_router, losses_ok_LR[:, i].tolist(), strict=True) if not ok]
            problem = f"non-finite {', '.join(bad)} in {records[i].name} (its router logits are finite)"
        if self.moe_config.skip_nonfinite:
            self.nonfinite = problem
            return
        raise FloatingPointError(f"{problem} (set skip_nonfinite=True to skip such steps instead)")

    COEFS = {
        "aux_loss": "aux_loss_coef",
        "z_loss": "z_loss_coef",
        "importance_loss": "importance_loss_coef",
        "contrastive_loss": "contrastive_loss_coef",
    }

    def weighted_aux_loss(self) -> Tensor:
        """sum_l coef_l * loss_l of the last forward (what `out.loss` adds)."""
        terms = [
            getattr(self.moe_config, self.COEFS[k]) * v
            for k, v in self._aux.items()
            if getattr(self.moe_config, self.COEFS[k]) > 0
        ]
        if terms:
            return torch.stack(terms).sum()
        device = next(iter(self._aux.values())).device if self._aux else None
        return torch.zeros((), device=device)

    def aux_losses(self) -> dict[str, Tensor]:
        """Balance losses of the last forward (unweighted, averaged over routers)."""
        return dict(self._aux)

    # ---- the moetune modules ---------------------------------------------------------------------
    def moe_layers(self) -> Iterator[tuple[str, RoutedLayer]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, RoutedLayer):
                yield name, module

    def adapter_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, ADAPTER_MODULES):
                yield name, module

    def routing_stats(self) -> dict[str, dict[str, Any]]:
        """Per MoE layer since the last reset: tokens per expert, load CV, router entropy, dead experts."""
        return {name: stats.summarize(layer.router) for name, layer in self.moe_layers()}

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

    def reset_routing_stats(self) -> None:
        for _, layer in self.moe_layers():
            stats.reset(layer.router)

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing, once per optimizer step: b_i += u * sign(mean_j c_j - c_i).

        c are the tokens each expert got since the last update, summed over data-parallel ranks.
        """
        rate = self.moe_config.bias_update_rate
        if rate <= 0:
            return
        for _, layer in self.moe_layers():
            router = layer.router
            counts = stats.all_reduce_sum(router.step_counts)
            router.expert_bias += rate * torch.sign(counts.mean() - counts).to(router.expert_bias.dtype)
            router.step_counts.zero_()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The frozen base model alone (e.g. the reference model of DPO), without a copy."""
        with self._context_set("adapter_enabled", False):
            yield

    @contextmanager
    def reference_path(self) -> Iterator[None]:
        """Compute experts with the slow per-expert loop (the tested truth of the fast path)."""
        with self._context_set("reference", True):
            yield

    @contextmanager
    def _context_set(self, field: str, value: Any) -> Iterator[None]:
        previous = getattr(self._ctx, field)
        setattr(self._ctx, field, value)
        try:
            yield
        finally:
            setattr(self._ctx, field, previous)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = {id(p): p for p in self.parameters()}.values()  # tied weights count once
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's `generate`; routing statistics skip the prompt's padding (left padding)."""
        mask = kwargs.get("attention_mask")
        self._ctx.token_mask = mask.bool() if mask is not None and mask.dim() == 2 else None
        try:
            return self.base_model.generate(*args, **kwargs)
        finally:
            self._ctx.token_mask = None

    # ---- saving ----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any) -> None:
        """Adapter only: `moetune_config.json` and `moetune_model.safetensors`."""
        from moetune.serialization import save_adapter

        save_adapter(self, save_directory)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, path: str | os.PathLike, is_trainable: bool = False, strict: bool = False
    ) -> MoEModel:
        """Inject the saved adapter into `model` and load its weights (frozen unless is_trainable).

        Checksums, tensor names and shapes are verified. A base whose fingerprint differs from the one
        the adapter was trained on (`moetune.provenance`) warns; with `strict=True` it is an error
        (`BaseMismatchError`), as is an adapter that records no fingerprint.
        """
        from moetune.serialization import load_adapter

        return load_adapter(cls, model, path, is_trainable=is_trainable, strict=strict)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)


def get_moe_model(model: nn.Module, config: MoEConfig | None = None) -> MoEModel:
    """Inject LoRA experts into `model` in place, freeze its weights, and wrap it in a `MoEModel`."""
    return MoEModel(model, config or MoEConfig())
