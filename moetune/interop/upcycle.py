"""Upcycle a peft LoRA adapter into MoE-LoRA: every routed expert starts as that LoRA.

Sparse upcycling (Komatsuzaki et al. 2023) starts the experts of an MoE from one trained dense
module; here the dense module is a peft LoRA and each expert a copy of it. peft's LoRA (Hu et al. 2021)
adds  s_p B A x  to a projection, with s_p = lora_alpha / r (rsLoRA, Kalajdzievski 2023: lora_alpha /
sqrt(r)), per module after peft's `rank_pattern` / `alpha_pattern`. A moetune expert adds  s_m B_e A_e x
with its own scaling s_m (`MoEConfig.scaling`; `attn_r` LoRA: lora_alpha / attn_r). Upcycling sets

    A_e = A + eps_e,    B_e = B * (s_p / s_m),    eps_e ~ N(0, (noise * std(A))^2)  i.i.d. per entry,

so with noise = 0 every expert's delta equals the LoRA's, and a mixture whose weights sum to 1 (topk,
topp, soft) is the LoRA: the upcycled model gives the peft model's outputs (switch and threshold routers
can drop a token, which then keeps the base output). The noise breaks the symmetry between the experts
(identical experts receive identical gradients but for the router weights); it is drawn from a
`torch.Generator` seeded with `seed`, module by module in name order, on the CPU in float32. Routers
are initialised as by `get_moe_model` (N(0, 0.02^2) from the global RNG); shared experts and the
projections the adapter has no LoRA on keep moetune's fresh initialisation (B = 0: no delta).
The adapter's attention (non-FFN) LoRA becomes moetune's `attn_r` LoRA and its `modules_to_save`
tensors the trained copies of `MoEConfig.modules_to_save`.

Refused, each with one error naming the module or field: an adapter that is not plain LoRA (another
`peft_type`, DoRA, LoRA bias, embedding LoRA, ...), a LoRA rank other than `r` (experts) or `attn_r`
(attention), a LoRA on a module the MoE config does not adapt.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from moetune.config import MoEConfig
from moetune.core.architectures import linear_dims, name_matches
from moetune.core.injection import InjectionPlan, plan
from moetune.core.layers import LoRALinear, MoEFFN, MoELinear, TrainableCopy
from moetune.io.atomic import read_json_object
from moetune.model import MoEModel, get_moe_model

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
_LORA_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")

# peft LoRA options that change what the adapter computes beyond  W x + s B A x: refused when set
UNSUPPORTED_OPTIONS = (
    "use_dora",  # DoRA: a learned magnitude per output feature
    "lora_bias",  # a bias on lora_B
    "use_qalora",
    "use_bdlora",
    "layer_replication",
    "target_parameters",  # LoRA on nn.Parameters (e.g. fused MoE weights)
    "trainable_token_indices",
    "alora_invocation_tokens",  # activated LoRA: on from an invocation token onwards
    "arrow_config",
    "monteclora_config",
    "kasa_config",
    "velora_config",
    "megatron_config",
)


@dataclass(frozen=True)
class PeftLoRA:
    """A peft LoRA adapter as read from its directory."""

    directory: str
    config: dict[str, Any]  # adapter_config.json
    lora: dict[str, tuple[Tensor, Tensor]]  # module path -> (A (r, d_in), B (d_out, r))
    saved: dict[str, Tensor]  # modules_to_save tensors by parameter path (e.g. "lm_head.weight")

    def scaling(self, module: str) -> float:
        """peft's s_p of `module`: its alpha (after `alpha_pattern`) / r (sqrt(r) with rsLoRA)."""
        r = self.lora[module][0].shape[0]
        alpha = self.config.get("lora_alpha", 8)
        for key, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):  # peft's get_pattern_key: first match wins
                alpha = value
                break
        return alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)

    def rank(self) -> int:
        """The rank most modules have (peft's `r` unless `rank_pattern` changes it everywhere)."""
        ranks = [A.shape[0] for A, _ in self.lora.values()]
        return max(set(ranks), key=ranks.count)


def read_peft_lora(directory: str | os.PathLike) -> PeftLoRA:
    """Read `adapter_config.json` and the weights (safetensors; a `.bin` only with weights_only=True),
    refusing whatever is not plain LoRA."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, PEFT_CONFIG_NAME)
    config = read_json_object(config_path, ValueError, " (no peft adapter config here)")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ValueError(
            f"{config_path}: peft_type={kind!r}: only peft LoRA adapters (peft_type 'LORA') can be upcycled"
        )
    for option in UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise ValueError(
                f"{config_path}: {option}={config[option]!r}: moetune experts are plain LoRA "
                f"(W x + s B A x); an adapter with {option} cannot be upcycled"
            )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{config_path}: bias={config['bias']!r}: the adapter trains biases of the base model, which "
            "moetune's experts do not hold; only bias='none' can be upcycled"
        )
    tensors = _read_weights(directory)
    lora_parts: dict[str, dict[str, Tensor]] = {}
    saved = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(
                f"{directory}: tensor {key!r} does not start with {PEFT_PREFIX!r}: not a peft adapter?"
            )
        name = key[len(PEFT_PREFIX) :]
        if match := _LORA_KEY.fullmatch(name):
            lora_parts.setdefault(match.group(1), {})[match.group(2)] = tensor
        elif "lora_" in name:
            raise ValueError(
                f"{directory}: tensor {name!r} is not a LoRA A/B weight of a linear layer (embedding LoRA, "
                "DoRA magnitude, ...): only LoRA on linear layers can be upcycled"
            )
        else:
            saved[name] = tensor
    lora = {}
    for module, parts in sorted(lora_parts.items()):
        if set(parts) != {"A", "B"}:
            raise ValueError(f"{directory}: module {module!r} has lora_{next(iter(parts))} but not its pair")
        A_rD, B_Fr = parts["A"], parts["B"]
        if A_rD.dim() != 2 or B_Fr.dim() != 2 or A_rD.shape[0] != B_Fr.shape[1]:
            raise ValueError(
                f"{directory}: module {module!r} has lora_A {tuple(A_rD.shape)} and lora_B "
                f"{tuple(B_Fr.shape)}: expected (r, d_in) and (d_out, r)"
            )
        lora[module] = (A_rD, B_Fr)
    if not lora:
        raise ValueError(f"{directory}: the adapter holds no LoRA weights")
    return PeftLoRA(directory, config, lora, saved)


def _read_weights(directory: str) -> dict[str, Tensor]:
    for name in PEFT_WEIGHTS_NAMES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            if name.endswith(".safetensors"):
                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # safetensors / torch raise their own types without the file name
            raise ValueError(f"{path}: not a readable weights file ({err})") from None
    raise FileNotFoundError(f"{directory}: no {' or '.join(PEFT_WEIGHTS_NAMES)} here")


def default_config(base_model: nn.Module, adapter: PeftLoRA) -> MoEConfig:
    """MoEConfig defaults (ffn experts) with the adapter's LoRA shape: r, lora_alpha, use_rslora and
    lora_dropout; attn_r = r when it has LoRA outside the FFN projections; its modules_to_save."""
    c = adapter.config
    modules = [n for n, _ in base_model.named_modules() if n]
    saves = [s for s in c.get("modules_to_save") or [] if any(name_matches(n, [s]) for n in modules)]
    r = adapter.rank()
    fields = dict(
        r=r,
        lora_alpha=c.get("lora_alpha", 8),
        use_rslora=bool(c.get("use_rslora")),
        lora_dropout=float(c.get("lora_dropout", 0.0)),
        modules_to_save=saves,
    )
    experts_only = plan(base_model, MoEConfig(**fields))
    if any(_place(experts_only, m) is None for m in adapter.lora):
        fields["attn_r"] = r
    return MoEConfig(**fields)


def _place(todo: InjectionPlan, module: str) -> tuple[str, str, str] | None:
    """Where a LoRA on `module` goes: (kind, wrapper path, projection) or None when nothing adapts it."""
    parent, _, proj = module.rpartition(".")
    if parent in todo.ffn and proj in todo.ffn_projections and proj in todo.ffn[parent].projections:
        return "ffn", parent, proj
    if module in todo.linear:
        return "linear", module, ""
    if module in todo.attention:
        return "attention", module, ""
    return None


def _check(base_model: nn.Module, adapter: PeftLoRA, cfg: MoEConfig) -> InjectionPlan:
    """Every refusal, before the base model is touched."""
    if hasattr(base_model, "peft_config"):
        raise ValueError("upcycle_lora: pass the plain transformers base model, not a peft model")
    if cfg.added_experts:
        raise ValueError(
            f"upcycle_lora: config.added_experts={cfg.added_experts!r}: upcycle into the first task's "
            "experts, then call add_experts"
        )
    todo = plan(base_model, cfg)
    for module, (A_rD, B_Fr) in adapter.lora.items():
        where = _place(todo, module)
        if where is None:
            raise ValueError(
                f"{adapter.directory}: the adapter has LoRA on {module!r}, which this MoEConfig does not "
                f"adapt (expert_type={cfg.expert_type!r}, target_modules={cfg.target_modules!r}, "
                f"attn_r={cfg.attn_r}, attn_target_modules={cfg.attn_target_modules!r}): name it in "
                "target_modules or attention LoRA (attn_r > 0)"
            )
        rank, field = (cfg.attn_r, "attn_r") if where[0] == "attention" else (cfg.r, "r")
        if A_rD.shape[0] != rank:
            raise ValueError(
                f"{adapter.directory}: the LoRA on {module!r} has rank {A_rD.shape[0]} but the MoEConfig has "
                f"{field}={rank}: set {field}={A_rD.shape[0]} (each expert is a copy of that LoRA)"
            )
        d_in, d_out = linear_dims(base_model.get_submodule(module))
        if A_rD.shape[1] != d_in or B_Fr.shape[0] != d_out:
            raise ValueError(
                f"{adapter.directory}: the LoRA on {module!r} maps {A_rD.shape[1]} -> {B_Fr.shape[0]} "
                f"features but this base model's module maps {d_in} -> {d_out}: another base model?"
            )
    for key, tensor in adapter.saved.items():
        owner = next((s for s in todo.save if key.startswith(s + ".")), None)
        if owner is None:
            raise ValueError(
                f"{adapter.directory}: tensor {key!r} belongs to a module the adapter trains in full "
                f"(peft modules_to_save={adapter.config.get('modules_to_save')!r}); add that module to "
                f"MoEConfig.modules_to_save (now {cfg.modules_to_save!r})"
            )
        target = base_model.get_submodule(owner).state_dict().get(key[len(owner) + 1 :])
        if target is None or target.shape != tensor.shape:
            shape = None if target is None else tuple(target.shape)
            raise ValueError(
                f"{adapter.directory}: tensor {key!r} has shape {tuple(tensor.shape)}; this base model's "
                f"{owner!r} has {shape} there"
            )
    return todo


def upcycle_lora(
    base_model: nn.Module,
    lora_dir: str | os.PathLike,
    config: MoEConfig | None = None,
    noise: float = 0.0,
    seed: int = 0,
) -> MoEModel:
    """A `MoEModel` whose routed experts all start as the peft LoRA adapter in `lora_dir` (see the module
    docstring for the formula and what is refused).

    `config` None: `default_config` (MoEConfig defaults with the adapter's r, lora_alpha, use_rslora,
    lora_dropout, modules_to_save; attn_r = r when the adapter has attention LoRA). `noise`: the std of
    the Gaussian added to each expert's A, relative to std(A) of that module's LoRA (0 = exact copies).
    The base model is changed in place as by `get_moe_model`, and left untouched when refused.
    """
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not 0.0 <= noise < math.inf:
        raise ValueError(f"upcycle_lora: noise={noise!r}: must be a finite number >= 0 (0 = exact copies)")
    adapter = read_peft_lora(lora_dir)
    cfg = config if config is not None else default_config(base_model, adapter)
    todo = _check(base_model, adapter, cfg)
    model = get_moe_model(base_model, cfg)
    generator = torch.Generator().manual_seed(seed)
    base = model.base_model
    with torch.no_grad():
        for module, (A_rD, B_Fr) in adapter.lora.items():  # sorted by name: a fixed order of noise draws
            s_p = adapter.scaling(module)
            kind, path, proj = _place(todo, module)
            wrapper = base.get_submodule(path)
            if kind == "attention":
                assert isinstance(wrapper, LoRALinear)
                bank = wrapper.lora
                bank.lora_A[0][0].copy_(A_rD)
                bank.lora_B[0][0].copy_(B_Fr * (s_p / bank.scaling))
                continue
            assert isinstance(wrapper, (MoEFFN, MoELinear))
            bank = wrapper.experts[proj] if kind == "ffn" else wrapper.experts
            E = wrapper.router.num_experts  # routed experts; the shared ones follow them in block 0
            if bank.shared_A:  # asymmetric experts: the one A is the LoRA's A
                if noise > 0:
                    raise ValueError(
                        f"noise={noise}: with asymmetric_experts the experts share one A, so noise on A "
                        "cannot tell them apart; use noise=0"
                    )
                bank.lora_A[0][0].copy_(A_rD)
            else:
                A_ErD = A_rD.float().expand(E, *A_rD.shape)
                if noise > 0:
                    std = noise * A_rD.float().std().item()
                    A_ErD = A_ErD + std * torch.randn(A_ErD.shape, generator=generator)
                bank.lora_A[0][:E].copy_(A_ErD)
            bank.lora_B[0][:E].copy_((B_Fr.float() * (s_p / bank.scaling)).expand(E, *B_Fr.shape))
        for key, tensor in adapter.saved.items():
            owner = next(s for s in todo.save if key.startswith(s + "."))
            copy = base.get_submodule(owner)
            assert isinstance(copy, TrainableCopy)
            copy.trained.state_dict()[key[len(owner) + 1 :]].copy_(tensor)
    return model
