"""TRL's `DPOTrainer` for a moetune `MoEModel`, with the frozen base as the reference model (no copy).

DPO (Rafailov et al. 2023) compares the policy's log-probabilities with those of a fixed reference
model. For an adapter the natural reference is the frozen base: the policy with every adapter off.
TRL does this itself only for peft models; for any other model without a `ref_model` it loads a
second copy of the base from `model.config._name_or_path`. `MoEDPOTrainer` instead passes TRL a
`DisabledAdapterReference`, a view that runs the policy inside `disable_adapter()`, so TRL's own
reference forward (`self.ref_model(..., fused_lm_head=True)`) gives the base model's log-probs.
With `precompute_ref_log_probs=True` TRL calls `compute_ref_log_probs` on the policy itself before
training, which is overridden here to run with the adapter off.

    from moetune.train.dpo import MoEDPOTrainer
    trainer = MoEDPOTrainer(model=moe_model, args=DPOConfig(...), train_dataset=pairs, processing_class=tok)

A `ref_model` passed by the user is used as given. Tested with TRL 1.16.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from accelerate.utils import DistributedType
from torch import Tensor, nn
from trl import DPOConfig, DPOTrainer

from moetune.model import MoEModel
from moetune.train.trainer import DisabledAdapterReference, MoETrainerMixin, unwrap_moe


class MoEDPOTrainer(MoETrainerMixin, DPOTrainer):
    """`trl.DPOTrainer` with the moetune mixin; the reference model is the policy with its adapter off."""

    def __init__(
        self,
        model: nn.Module,
        ref_model: nn.Module | None = None,
        args: DPOConfig | None = None,
        *rest: Any,
        **kwargs: Any,
    ) -> None:
        args = args if args is not None else DPOConfig("moetune-dpo")
        if ref_model is None:
            ref_model = self._base_as_reference(unwrap_moe(model), args)
        super().__init__(model, ref_model, args, *rest, **kwargs)

    @staticmethod
    def _base_as_reference(moe: MoEModel, args: DPOConfig) -> DisabledAdapterReference | None:
        """What to hand TRL as `ref_model` so that the reference is the frozen base, never a copy of it."""
        if args.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True: the reference is the frozen base model (the adapter turned off), "
                "there is no separate reference model to synchronise; pass your own ref_model for TR-DPO"
            )
        if args.precompute_ref_log_probs:
            return None  # TRL then keeps no reference model and calls compute_ref_log_probs on the policy
        if args.distributed_state.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise NotImplementedError(
                "MoEDPOTrainer under FSDP/DeepSpeed: TRL would wrap the reference view as a second model; "
                "set precompute_ref_log_probs=True or pass a ref_model"
            )
        return DisabledAdapterReference(moe)

    def compute_ref_log_probs(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """TRL's precomputed reference log-probs, (B,) chosen and (B,) rejected, with the adapter off.

        With no reference model TRL runs the policy (`model`, maybe inside an inference engine) here.
        """
        adapter_off = unwrap_moe(self.model).disable_adapter() if self.ref_model is None else nullcontext()
        with adapter_off:
            return super().compute_ref_log_probs(model, inputs)
