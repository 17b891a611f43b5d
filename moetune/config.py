"""`MoEConfig`: every knob of a mixture of LoRA experts, with its help text.

The help text in each field's metadata is the documentation: the CLI's `--help` and the docs are
generated from it. Validation that needs no model happens here; checks against a model's modules
happen at injection (`moetune.model`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import reprlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ROUTERS = ("topk", "topp", "soft", "switch", "threshold")
EXPERT_TYPES = ("ffn", "linear")
ROUTER_DTYPES = ("float32", "float64", "bfloat16", "float16")
ADAPTER_DTYPES = ("auto", "float32", "bfloat16", "float16")
CONTRASTIVE_MODES = ("expert", "survey")
TASK_ROUTINGS = ("none", "task", "token+task")

CONFIG_NAME = "moetune_config.json"


def _f(default: Any, help: str) -> Any:
    """A dataclass field whose help text lives in its metadata (the peft convention)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class MoEConfig:
    """Configuration of a mixture of LoRA experts injected into a frozen Hugging Face model."""

    expert_type: str = _f(
        "ffn",
        "'ffn': one router per feed-forward block; each expert is the frozen FFN with its own LoRA on the "
        "FFN projections (MixLoRA). 'linear': every targeted linear layer gets its own router and E "
        "LoRA-delta experts (LoRAMoE / MoLA); the way for encoders such as BERT.",
    )
    num_experts: int | list[int] = _f(
        8,
        "Routed experts per MoE layer: an int, or a list with one entry per transformer layer. 1 with "
        "top_k 1 is one plain LoRA on the same projections (peft's LoRA, exactly): a comparison's baseline.",
    )
    top_k: int = _f(2, "Experts per token for the 'topk' router.")
    router: str = _f(
        "topk",
        "'topk'; 'topp' (smallest set with probability mass >= top_p); 'soft' (all experts, dense); "
        "'switch' (top-1 with capacity_factor; overflow tokens keep the base output); "
        "'threshold' (AdaMoLE: experts whose probability exceeds a learned per-token threshold).",
    )
    top_p: float = _f(0.8, "'topp' router: probability mass the selected experts must reach.")
    capacity_factor: float = _f(
        1.25,
        "'switch' router: each expert takes at most ceil(capacity_factor * T / E) tokens of a micro-batch.",
    )
    threshold_max: float | None = _f(
        None, "'threshold' router: tau_max of AdaMoLE, the largest threshold; null = 1/E."
    )
    r: int = _f(8, "LoRA rank of each expert.")
    lora_alpha: float = _f(
        16, "LoRA alpha; the delta is scaled by lora_alpha / r (or / sqrt(r) with rsLoRA)."
    )
    lora_dropout: float = _f(0.05, "Dropout on the expert input, applied once per token, training only.")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA scaling lora_alpha / sqrt(r).")
    target_modules: list[str] | str | None = _f(
        None,
        "Modules to put experts on. 'ffn': names of the FFN projections that carry expert LoRA. 'linear': "
        "linear layers to turn into MoE layers. A list matches module names or dotted suffixes; a string "
        "is a full-match regular expression. null = the architecture's FFN projections.",
    )
    asymmetric_experts: bool = _f(
        False,
        "Asymmetric experts (HydraLoRA, Tian et al. 2024): the experts of each adapted projection share one "
        "LoRA A (the down-projection to rank r) and each has its own routed B; each task block added by "
        "add_experts gets its own shared A.",
    )
    attn_r: int = _f(0, "Rank of plain (non-expert) LoRA on the attention projections; 0 = none.")
    attn_target_modules: list[str] | str | None = _f(
        None, "Attention projections for attn_r LoRA (same matching rules); null = the architecture's."
    )
    num_shared_experts: int = _f(
        0, "Always-on LoRA experts added to every token (DeepSeekMoE shared / MoCLE universal expert)."
    )
    router_dtype: str = _f(
        "float32",
        "Precision of router logits, softmax and top-k, whatever the model's dtype (also under autocast).",
    )
    adapter_dtype: str = _f(
        "auto",
        "Storage dtype of the trained LoRA weights (experts, shared experts, attention LoRA). 'auto': fp32 "
        "master weights over a bf16/fp16 base (peft's autocast_adapter_dtype), the base's dtype over an "
        "fp32/fp64 one; 'bfloat16' / 'float16' / 'float32': that dtype (half precision halves the adapter's "
        "weight, gradient and optimizer memory, at the cost of low-precision updates).",
    )
    router_jitter: float = _f(
        0.0, "Multiplicative U(1-eps, 1+eps) noise on the router input during training; 0 = off."
    )
    aux_loss_coef: float = _f(0.01, "Weight of the Switch load-balancing loss.")
    z_loss_coef: float = _f(0.001, "Weight of the ST-MoE router z-loss.")
    importance_loss_coef: float = _f(0.0, "Weight of Shazeer's importance loss (CV^2 of the gates).")
    contrastive_loss_coef: float = _f(0.0, "Weight of the contrastive expert loss.")
    contrastive_mode: str = _f(
        "expert", "'expert' (Luo et al. 2024: each expert's outputs cluster) or 'survey' (token-wise)."
    )
    contrastive_temperature: float = _f(0.1, "Temperature of the contrastive loss.")
    contrastive_sample: int = _f(
        256, "Tokens per micro-batch the contrastive loss is computed on (each costs E extra expert runs)."
    )
    bias_update_rate: float = _f(
        0.0,
        "Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for selection only, "
        "moved by this rate after every optimizer step; 0 = off.",
    )
    modules_to_save: list[str] = _f(
        [], "Extra modules trained in full and saved with the adapter (e.g. a classification head)."
    )
    task: str = _f("default", "The task that owns the experts created at injection.")
    extra_tasks: list[str] = _f(
        [],
        "More tasks, owning no experts of their own: they route among all experts. With task_routing "
        "(MOELoRA-style multi-task training) every task has its own learned embedding; task_ids and "
        "use_tasks name them like any task.",
    )
    added_experts: list[dict[str, Any]] = _f(
        [],
        "Expert blocks appended by MoEModel.add_experts, in order, as {'task', 'num_experts', "
        "'freeze_existing'}; written by moetune, and added again by from_pretrained before the weights load.",
    )
    task_routing: str = _f(
        "none",
        "'none'; 'task' (MOELoRA: the gate sees only a learned task embedding, a fixed mixture per "
        "task); 'token+task' (the task's embedding is added to the router input). Both need the task "
        "of every sample: task_ids in the forward, or use_tasks with one task.",
    )
    skip_nonfinite: bool = _f(
        False,
        "False: NaN/inf in router logits or losses raises an error naming the layer; True (with MoETrainer): "
        "that optimizer step is skipped (gradients dropped, expert bias kept), warned and counted in the "
        "logs as moe/skipped_steps.",
    )
    dead_expert_steps: int = _f(
        100,
        "MoETrainer: warn in the logs, once per expert and naming its layer, when an expert has received "
        "no token for this many consecutive optimizer steps; 0 = never.",
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _choice("expert_type", self.expert_type, EXPERT_TYPES)
        _choice("router", self.router, ROUTERS)
        _choice("router_dtype", self.router_dtype, ROUTER_DTYPES)
        _choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        _choice("contrastive_mode", self.contrastive_mode, CONTRASTIVE_MODES)
        _choice("task_routing", self.task_routing, TASK_ROUTINGS)
        _check_tasks(self)
        counts = self.num_experts if isinstance(self.num_experts, list) else [self.num_experts]
        if not counts or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in counts):
            raise ValueError(
                f"num_experts={short_repr(self.num_experts)}: must be an int >= 1 or a list of them"
            )
        _positive_int("r", self.r)
        _positive_int("top_k", self.top_k)
        if self.router == "topk" and self.top_k > min(counts):
            raise ValueError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts!r}: allowed 1..{min(counts)}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: allowed 0 < top_p <= 1")
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={self.capacity_factor}: must be > 0")
        if self.threshold_max is not None and not 0.0 < self.threshold_max <= 1.0:
            raise ValueError(f"threshold_max={self.threshold_max}: allowed 0 < threshold_max <= 1, or null")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout}: allowed 0 <= lora_dropout < 1")
        if self.attn_r < 0:
            raise ValueError(f"attn_r={self.attn_r}: must be >= 0 (0 = no attention LoRA)")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={self.num_shared_experts}: must be >= 0")
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"router_jitter={self.router_jitter}: allowed 0 <= router_jitter < 1")
        for name in (
            "aux_loss_coef",
            "z_loss_coef",
            "importance_loss_coef",
            "contrastive_loss_coef",
            "bias_update_rate",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.contrastive_temperature <= 0:
            raise ValueError(f"contrastive_temperature={self.contrastive_temperature}: must be > 0")
        _positive_int("contrastive_sample", self.contrastive_sample)
        steps = self.dead_expert_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"dead_expert_steps={steps!r}: must be an int >= 0 (0 = no warning)")
        if self.router == "soft" and self.aux_loss_coef > 0:
            warnings.warn(
                "aux_loss_coef > 0 with router='soft': the Switch loss is constant for dense routing "
                "(every expert gets every token); set aux_loss_coef=0 or use importance_loss_coef.",
                stacklevel=3,
            )

    # ----------------------------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def experts_in_layer(self, layer: int, num_layers: int) -> int:
        """Routed experts of transformer layer `layer` (checks a per-layer list against the model)."""
        if isinstance(self.num_experts, int):
            return self.num_experts
        if len(self.num_experts) != num_layers:
            raise ValueError(
                f"num_experts has {len(self.num_experts)} entries but the model has {num_layers} layers: "
                "give one entry per layer, or an int"
            )
        return self.num_experts[layer]

    def task_names(self) -> list[str]:
        """Every task: `task`, `extra_tasks`, then those of `added_experts` (task index = position)."""
        return [self.task, *self.extra_tasks, *(block["task"] for block in self.added_experts)]

    def task_blocks(self) -> list[int | None]:
        """Per task (as `task_names`): the expert block it owns, or None for a task that owns none."""
        return [0, *(None for _ in self.extra_tasks), *range(1, len(self.added_experts) + 1)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "MoEConfig") -> MoEConfig:
        """Build from a dict; unknown keys (e.g. from a newer version) warn naming `where` and are dropped."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping of MoEConfig fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            warnings.warn(
                f"{where}: ignoring unknown MoEConfig keys {unknown} (written by a newer moetune?)",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MoEConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> tuple[MoEConfig, dict[str, Any]]:
        """Read `moetune_config.json`; returns the config and the raw dict (with saved extras)."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no moetune adapter config here")
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except RecursionError:
                raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
            except ValueError as err:  # also not UTF-8, or an integer of more than 4300 digits
                raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of MoEConfig fields, got {type(data).__name__}")
        extras = {k: data.pop(k) for k in list(data) if k.startswith("_")}
        try:
            return cls.from_dict(data, where=path), extras
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @staticmethod
    def help() -> dict[str, str]:
        """Field name -> help text (used by the CLI and the docs)."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(MoEConfig)}


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        shown = short_repr(value)
        raise ValueError(f"{name}={shown} is not supported: allowed {', '.join(map(repr, allowed))}")


_BLOCK_KEYS = ("task", "num_experts", "freeze_existing")


def _check_tasks(config: MoEConfig) -> None:
    """Task names are distinct non-empty strings; each added block is {task, num_experts >= 1, bool}."""
    if not isinstance(config.task, str) or not config.task:
        raise ValueError(f"task={short_repr(config.task)}: must be a non-empty string")
    if not isinstance(config.added_experts, list):
        raise ValueError(f"added_experts={short_repr(config.added_experts)}: must be a list of blocks")
    seen = [config.task]
    if not isinstance(config.extra_tasks, list):
        raise ValueError(f"extra_tasks={short_repr(config.extra_tasks)}: must be a list of task names")
    for i, task in enumerate(config.extra_tasks):
        if not isinstance(task, str) or not task or task in seen:
            raise ValueError(
                f"extra_tasks[{i}]={short_repr(task)}: must be a new non-empty name (tasks before: {seen})"
            )
        seen.append(task)
    for i, block in enumerate(config.added_experts):
        if not isinstance(block, dict) or sorted(block) != sorted(_BLOCK_KEYS):
            raise ValueError(
                f"added_experts[{i}]={short_repr(block)}: must be a mapping with exactly the keys "
                f"{list(_BLOCK_KEYS)}"
            )
        task, n = block["task"], block["num_experts"]
        if not isinstance(task, str) or not task or task in seen:
            raise ValueError(
                f"added_experts[{i}]: task={short_repr(task)} must be a new non-empty name "
                f"(tasks before: {seen})"
            )
        _positive_int(f"added_experts[{i}].num_experts", n)
        if not isinstance(block["freeze_existing"], bool):
            shown = short_repr(block["freeze_existing"])
            raise ValueError(f"added_experts[{i}].freeze_existing={shown}: must be true or false")
        seen.append(task)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={short_repr(value)}: must be an int >= 1")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 200, 200


def short_repr(value: Any) -> str:
    """repr() for error messages, bounded in size (a YAML alias bomb must not hang the message)."""
    return _REPR.repr(value)


def _finite_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def _strings(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


# annotation of a field -> (check, what is allowed); "X | None" fields also take None
_TYPE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**63, "a 64-bit int"),
    "float": (_finite_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list[str]": (_strings, "a list of strings"),
    "list[str] | str": (lambda v: isinstance(v, str) or _strings(v), "a string or a list of strings"),
}


def _check_types(config: MoEConfig) -> None:
    """Each field's value has its annotated type (values from YAML/JSON/CLI may be anything)."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        if kind.endswith(" | None"):
            if value is None:
                continue
            kind = kind.removesuffix(" | None")
        check, allowed = _TYPE_CHECKS.get(kind, (lambda v: True, ""))
        if not check(value):
            raise ValueError(f"{f.name}={short_repr(value)}: must be {allowed}")
