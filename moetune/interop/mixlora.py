"""MixLoRA adapters (MoE-PEFT's format) to and from moetune adapters: `from_mixlora`, `to_mixlora`.

The MixLoRA format (Li et al. 2024, "MixLoRA"; written by MoE-PEFT, read by the `mixlora` package 0.2.3)
is a directory with
  adapter_config.json  peft_type "MIXLORA", routing_strategy "mixlora", num_experts, top_k, r, lora_alpha,
                       lora_dropout, use_rslora, use_dora, target_modules (a list, or {name: bool}), act_fn,
                       jitter_noise, router_aux_loss_coef, router_loss, router_init_range,
                       base_model_name_or_path, task_type; optionally expert_lora {r, lora_alpha, ...}: the
                       experts' LoRA, the top level then being the attention LoRA's (MoE-PEFT; the mixlora
                       package ignores expert_lora and uses the top level for both).
  adapter_model.bin    a torch-pickled flat dict of tensors (read here with weights_only=True), per layer i:
                         mixlora.layers.{i}.mlp.moe_gate.weight                       (E, D)
                         mixlora.layers.{i}.mlp.{proj}.experts.{j}.lora_A.weight       (r, d_in)
                         mixlora.layers.{i}.mlp.{proj}.experts.{j}.lora_B.weight       (d_out, r)
                         mixlora.layers.{i}.self_attn.{proj}.lora_{A,B}.weight         attention LoRA
                       (`adapter_model.safetensors` with the same keys is read too, and preferred.)

The maths is moetune's `expert_type="ffn"`, `router="topk"`: logits = x W_gate^T and their softmax in
fp32, the top-k probabilities renormalised to sum 1, output sum_i g_i FFN_i(x) with FFN_i the frozen
FFN with W + s B_i A_i on its projections (moetune computes FFN(x) + sum_i g_i (FFN_i(x) - FFN(x)), the
same when the g_i sum to 1), s = lora_alpha / r (or / sqrt(r) with rsLoRA). Outputs agree to float
rounding (MixLoRA scales after B, moetune before). Differences that do not change an adapter's outputs:
  - jitter_noise = router_jitter (multiplicative U(1-eps, 1+eps) on the router input, training only; the
    mixlora package 0.2.3 also applies it at inference);
  - LoRA dropout: MixLoRA draws a mask per expert and projection, moetune one per token (training only);
  - balance loss: MoE-PEFT's is transformers' Mixtral loss, top_k times moetune's Switch loss (Fedus et
    al. 2021), so aux_loss_coef = top_k * router_aux_loss_coef (0 with router_loss false); MoE-PEFT
    pools the tokens of all layers where moetune averages per-layer losses. MixLoRA has no z-loss,
    importance or contrastive loss: they are 0 after import and dropped (with a warning) at export;
  - act_fn: MixLoRA's experts use the named activation, moetune's the FFN's own. With a base model the
    two are compared and a different one refused; at export the base's activation is written.
  - attention LoRA: MixLoRA scales it with the top-level alpha and r, moetune with lora_alpha / attn_r;
    where these differ the ratio is folded into the imported B (exact up to one rounding).

Refused (`ConversionError`, one line naming the value): at import, routing strategies other than
"mixlora" (MoE-PEFT's "mixlora-dynamic" keeps unrenormalised top-p weights, "mixlora-switch" has
capacity), DoRA, LoRA biases, Phi-1/2 MLPs (fc1/fc2); at export, whatever MixLoRA cannot hold (see
`check_exportable`).

The moetune adapter needs its base model only for provenance. `from_mixlora(..., base=None)` writes it
from the MixLoRA file alone (the module names of a `*ForCausalLM`, the only layout MixLoRA addresses), with
`_base_model` = base_model_name_or_path and no base fingerprint: it loads with `from_pretrained`, and
`strict=True` refuses it for want of a fingerprint. With `base` (a model or a local model directory) the
adapter is built on that model, so names, shapes and act_fn are checked and its fingerprint recorded:
what `MoEModel.save_pretrained` writes for it.

Writes: a new destination directory is written beside it under a temporary name, then renamed; into an
existing directory each file is replaced atomically (the weights first).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moetune.config import CONFIG_NAME, MoEConfig, short_repr
from moetune.core.architectures import find_ffn_spec
from moetune.io import adapter as adapter_format
from moetune.io import provenance
from moetune.io.atomic import atomic_write, atomic_write_text, publish_dir, read_json_object

MIXLORA_CONFIG = "adapter_config.json"
MIXLORA_WEIGHTS = "adapter_model.bin"
MIXLORA_SAFETENSORS = "adapter_model.safetensors"

# projections both MixLoRA and moetune place LoRA on, in a fixed order (the order of the config lists)
FFN_PROJS = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")  # Llama family; Phi-3's fused gate_up
ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
# the target names MixLoRA knows (its `lora_target_modules`); it drops any other
MIXLORA_TARGETS = (*ATTN_PROJS, *FFN_PROJS, "dense", "fc1", "fc2")
ROUTER_INIT_RANGE = 0.02  # moetune's router initialisation, N(0, 0.02^2)

_KNOWN_KEYS = {
    "base_model_name_or_path", "task_type", "peft_type", "bias", "r", "lora_alpha", "lora_dropout",
    "target_modules", "use_dora", "use_rslora", "lora_init", "expert_lora", "routing_strategy",
    "num_experts", "top_k", "act_fn", "router_aux_loss_coef", "router_loss", "router_init_range",
    "jitter_noise",
}  # fmt: skip


class ConversionError(ValueError):
    """An adapter the other format cannot hold, or a file that is not what its format says."""


@dataclass
class Layers:
    """An adapter in neither format's names, per transformer layer i (tensors in the source dtype):
    gates[i] (E, D); experts[i][proj] = (A (E, r, d_in), B (E, d_out, r)); attention[i][proj] =
    (A (r, d_in), B (d_out, r))."""

    gates: list[Tensor]
    experts: list[dict[str, tuple[Tensor, Tensor]]]
    attention: list[dict[str, tuple[Tensor, Tensor]]]

    def check(self, where: str) -> None:
        """Every layer adapts the same projections (both formats address every layer alike)."""
        for kind, per_layer in (("expert", self.experts), ("attention LoRA", self.attention)):
            for proj in sorted({p for layer in per_layer for p in layer}):
                missing = [i for i, layer in enumerate(per_layer) if proj not in layer]
                if missing:
                    raise ConversionError(
                        f"{where}: {kind} on {proj} in some layers but not in layers {missing[:5]}: MixLoRA "
                        "adapts the same projections in every layer"
                    )


# ---- files ------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict[str, Any]:
    return read_json_object(path, ConversionError, " (not a MixLoRA adapter directory?)")


def _read_mixlora_tensors(src: str) -> tuple[str, dict[str, Tensor]]:
    """(file, tensors) of `adapter_model.safetensors`, else `adapter_model.bin` (torch.load, weights only)."""
    st, pt = os.path.join(src, MIXLORA_SAFETENSORS), os.path.join(src, MIXLORA_WEIGHTS)
    try:
        if os.path.isfile(st):
            path, tensors = st, load_file(st)
        elif os.path.isfile(pt):
            path, tensors = pt, torch.load(pt, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{pt}: no such file, nor {MIXLORA_SAFETENSORS} (not a MixLoRA adapter?)")
    except FileNotFoundError:
        raise
    except Exception as err:  # pickle / safetensors errors name no file
        raise ConversionError(
            f"{st if os.path.isfile(st) else pt}: not a readable tensor file ({err})"
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) and v.is_floating_point() for k, v in tensors.items()
    ):
        raise ConversionError(f"{path}: expected a dict of floating-point tensors by name")
    return path, tensors


# ---- grouping tensors by name -----------------------------------------------------------------------
def _group(tensors: dict[str, Tensor], patterns: dict[str, re.Pattern], where: str, refuse: str) -> dict:
    """kind -> {match groups: tensor}; a name matching no pattern is an error (`refuse` says why)."""
    out: dict[str, dict[tuple, Tensor]] = {kind: {} for kind in patterns}
    for name, tensor in tensors.items():
        for kind, pattern in patterns.items():
            m = pattern.fullmatch(name)
            if m:
                groups = tuple(int(g) if g.isdigit() else g for g in m.groups())
                out[kind][groups] = tensor
                break
        else:
            raise ConversionError(f"{where}: tensor {name}: {refuse}")
    return out


def _num_layers(layer_ids: set[int], where: str, what: str) -> int:
    L = len(layer_ids)
    if L == 0 or layer_ids != set(range(L)):
        shown = sorted(layer_ids)[:8]
        raise ConversionError(f"{where}: {what} for layers {shown}: expected one per layer 0..L-1")
    return L


def _lora_pair(
    found: dict[tuple, Tensor], key: tuple, prefix: str, r: int, where: str
) -> tuple[Tensor, Tensor]:
    """Take (A (r, d_in), B (d_out, r)) of one LoRA out of `found` (keys `(*key, "A" | "B")`), named
    `{prefix}.lora_A.weight` / `lora_B` in its file."""
    A, B = found.pop((*key, "A"), None), found.pop((*key, "B"), None)
    for ab, t in (("A", A), ("B", B)):
        if t is None:
            raise ConversionError(f"{where}: {prefix}.lora_{ab}.weight is missing")
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
        raise ConversionError(
            f"{where}: {prefix}.lora_A/B.weight have shapes {tuple(A.shape)} / {tuple(B.shape)}: expected "
            f"(r, d_in) / (d_out, r) with r={r}"
        )
    return A, B


def _ordered(names: set[str], order: tuple[str, ...]) -> list[str]:
    return [p for p in order if p in names]


# ---- MixLoRA -> moetune ---------------------------------------------------------------------------------
_MIX = {
    "gate": re.compile(r"mixlora\.layers\.(\d+)\.mlp\.moe_gate\.weight"),
    "expert": re.compile(r"mixlora\.layers\.(\d+)\.mlp\.(\w+)\.experts\.(\d+)\.lora_([AB])\.weight"),
    "attn": re.compile(r"mixlora\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.weight"),
}


@dataclass
class MixSettings:
    """A checked adapter_config.json: the experts' LoRA (MoE-PEFT's expert_lora over the top level) and
    the attention LoRA's rank and scaling (the top level)."""

    num_experts: int
    top_k: int
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    attn_r: int
    attn_scaling: float
    targets: set[str]
    act_fn: str | None
    jitter: float
    aux_loss_coef: float  # moetune's: top_k * router_aux_loss_coef, 0 when router_loss is false
    base_model: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def read_mixlora_config(data: dict[str, Any], where: str) -> MixSettings:
    """Check a MixLoRA adapter_config.json (as a dict) and read what moetune needs from it."""

    def get(key: str, default: Any, ok: Callable[[Any], bool], allowed: str, src: dict = data) -> Any:
        value = src.get(key, default)
        if not ok(value):
            raise ConversionError(f"{where}: {key}={short_repr(value)}: must be {allowed}")
        return value

    get("peft_type", None, lambda v: v == "MIXLORA", "'MIXLORA' (a MixLoRA adapter)")
    get(
        "routing_strategy",
        None,
        lambda v: v == "mixlora",
        "'mixlora' (top-k; MoE-PEFT's 'mixlora-dynamic' keeps unrenormalised top-p weights and "
        "'mixlora-switch' has an expert capacity: moetune computes neither the same way)",
    )
    get("bias", "none", lambda v: v in (None, "none"), "'none' (moetune's LoRA has no bias terms)")
    E = get("num_experts", None, lambda v: _is_int(v) and v >= 1, "an int >= 1")
    k = get("top_k", 2, lambda v: _is_int(v) and 1 <= v <= E, f"an int in 1..num_experts={E}")
    expert_lora = get("expert_lora", {}, lambda v: isinstance(v, dict), "a mapping (the experts' LoRA)")
    lora = []  # (r, alpha, dropout, rslora) of the attention LoRA (top level), then of the experts
    for src, prefix in ((data, ""), ({**data, **expert_lora}, "expert_lora.")):
        get("use_dora", False, lambda v: v is False, f"false ({prefix}use_dora: moetune has no DoRA)", src)
        r = get("r", None, lambda v: _is_int(v) and v >= 1, f"an int >= 1 ({prefix}r)", src)
        alpha = get("lora_alpha", None, lambda v: _is_num(v) and v > 0, f"> 0 ({prefix}lora_alpha)", src)
        dropout = get("lora_dropout", 0.0, lambda v: _is_num(v) and 0 <= v < 1, "in [0, 1)", src)
        rslora = get("use_rslora", False, lambda v: isinstance(v, bool), "true or false", src)
        lora.append((r, alpha, float(dropout), rslora))
    (attn_r, attn_alpha, _, attn_rslora), (r, alpha, dropout, rslora) = lora
    targets = data.get("target_modules")
    if isinstance(targets, dict) and all(isinstance(v, bool) for v in targets.values()):
        targets = [t for t, on in targets.items() if on]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        shown = short_repr(data.get("target_modules"))
        raise ConversionError(f"{where}: target_modules={shown}: must be a list of names or {{name: bool}}")
    from transformers.activations import ACT2CLS

    act = get("act_fn", None, lambda v: v is None or v in ACT2CLS, "null or a name in transformers' ACT2FN")
    jitter = get("jitter_noise", 0.0, lambda v: _is_num(v) and 0 <= v < 1, "in [0, 1)")
    coef = get("router_aux_loss_coef", 0.001, lambda v: _is_num(v) and v >= 0, "a number >= 0")
    router_loss = get("router_loss", True, lambda v: isinstance(v, bool), "true or false")
    base = get("base_model_name_or_path", "", lambda v: v is None or isinstance(v, str), "a string")
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        warnings.warn(
            f"{where}: settings moetune has no counterpart for, not carried over: {unknown}", stacklevel=3
        )
    return MixSettings(
        num_experts=E,
        top_k=k,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=rslora,
        attn_r=attn_r,
        attn_scaling=attn_alpha / (math.sqrt(attn_r) if attn_rslora else attn_r),
        targets=set(targets) & set(MIXLORA_TARGETS),  # MixLoRA drops names outside its table
        act_fn=act,
        jitter=float(jitter),
        aux_loss_coef=float(coef) * k if router_loss else 0.0,
        base_model=base or "",
    )


def layers_from_mixlora(tensors: dict[str, Tensor], mix: MixSettings, where: str) -> Layers:
    """What mixlora would use of `tensors`: per layer the gate, the E experts of every targeted FFN
    projection and the targeted attention LoRA (a target without weights is a module the base lacks)."""
    refuse = (
        "not a MixLoRA tensor name (mixlora.layers.{i}.mlp.moe_gate / .mlp.{proj}.experts.{j} / "
        ".self_attn.{proj})"
    )
    groups = _group(tensors, _MIX, where, refuse)
    L = _num_layers({i for (i,) in groups["gate"]}, where, "moe_gate weights")
    E = mix.num_experts
    found = {
        kind: {k: t for k, t in groups[kind].items() if k[1] in mix.targets} for kind in ("expert", "attn")
    }
    unused = sorted({k[1] for kind in found for k in groups[kind]} - mix.targets)
    if unused:
        warnings.warn(
            f"{where}: weights for {unused}, not in target_modules: unused by MixLoRA, dropped", stacklevel=3
        )
    projs = {kind: {k[1] for k in found[kind]} for kind in found}
    for kind, allowed in (("expert", FFN_PROJS), ("attn", ATTN_PROJS)):
        if projs[kind] - set(allowed):
            what = "experts" if kind == "expert" else "attention LoRA"
            raise ConversionError(
                f"{where}: LoRA on {sorted(projs[kind] - set(allowed))}: moetune places {what} on "
                f"{list(allowed)} (Phi-1/2's fc1, fc2 and dense are not supported)"
            )
    if not projs["expert"]:
        raise ConversionError(f"{where}: holds no expert weights for the targets {sorted(mix.targets)}")
    layers = Layers([], [{} for _ in range(L)], [{} for _ in range(L)])
    for i in range(L):
        gate = groups["gate"][(i,)]
        if gate.dim() != 2 or gate.shape[0] != E:
            raise ConversionError(
                f"{where}: mixlora.layers.{i}.mlp.moe_gate.weight has shape {tuple(gate.shape)}: expected "
                f"(num_experts={E}, hidden size)"
            )
        layers.gates.append(gate)
        for proj in _ordered(projs["expert"], FFN_PROJS):
            pairs = [
                _lora_pair(
                    found["expert"], (i, proj, j), f"mixlora.layers.{i}.mlp.{proj}.experts.{j}", mix.r, where
                )
                for j in range(E)
            ]
            layers.experts[i][proj] = (torch.stack([A for A, _ in pairs]), torch.stack([B for _, B in pairs]))
        for proj in _ordered(projs["attn"], ATTN_PROJS):
            prefix = f"mixlora.layers.{i}.self_attn.{proj}"
            layers.attention[i][proj] = _lora_pair(found["attn"], (i, proj), prefix, mix.attn_r, where)
    leftover = sorted(found["expert"]) + sorted(found["attn"])
    if leftover:
        i, proj, *rest = leftover[0]
        expert = f" expert {rest[0]}" if len(rest) == 2 else ""
        raise ConversionError(
            f"{where}: weights of layer {i} {proj}{expert} lie outside the adapter's {L} layers (one "
            f"moe_gate each) and num_experts={E}"
        )
    return layers


def moe_config_from(mix: MixSettings, layers: Layers) -> MoEConfig:
    """The moetune config that computes what this MixLoRA adapter computes (module docstring)."""
    attn = _ordered(set(layers.attention[0]), ATTN_PROJS)
    return MoEConfig(
        expert_type="ffn",
        router="topk",
        num_experts=mix.num_experts,
        top_k=mix.top_k,
        r=mix.r,
        lora_alpha=mix.lora_alpha,
        lora_dropout=mix.lora_dropout,
        use_rslora=mix.use_rslora,
        target_modules=_ordered(set(layers.experts[0]), FFN_PROJS),
        attn_r=mix.attn_r if attn else 0,
        attn_target_modules=attn or None,
        router_dtype="float32",
        router_jitter=mix.jitter,
        aux_loss_coef=mix.aux_loss_coef,
        z_loss_coef=0.0,
        importance_loss_coef=0.0,
        contrastive_loss_coef=0.0,
    )


def _stored_dtype(t: Tensor) -> torch.dtype:
    """moetune keeps float32 adapter weights over low-precision bases (float64 stays float64)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _attn_scaling(config: MoEConfig) -> float:
    """The scaling moetune gives attention LoRA (`injection`): lora_alpha / attn_r, or / sqrt(attn_r)."""
    return config.lora_alpha / (math.sqrt(config.attn_r) if config.use_rslora else config.attn_r)


def moetune_tensors(layers: Layers, attn_factor: float = 1.0) -> dict[str, Tensor]:
    """`layers` under the names `MoEModel.save_pretrained` gives them on a `*ForCausalLM`
    (`model.layers.{i}...`); the attention B times `attn_factor` (a scaling difference folded in)."""
    out: dict[str, Tensor] = {}
    for i, gate in enumerate(layers.gates):
        prefix = f"model.layers.{i}.mlp"
        out[f"{prefix}.router.weight_blocks.0"] = gate.to(torch.float32).contiguous()  # (E, D)
        out[f"{prefix}.router.expert_bias"] = torch.zeros(gate.shape[0], dtype=torch.float32)  # (E,)
        for proj, (A_ErD, B_EFr) in layers.experts[i].items():
            out[f"{prefix}.experts.{proj}.lora_A.0"] = A_ErD.to(_stored_dtype(A_ErD)).contiguous()
            out[f"{prefix}.experts.{proj}.lora_B.0"] = B_EFr.to(_stored_dtype(B_EFr)).contiguous()
        for proj, (A_rD, B_Fr) in layers.attention[i].items():
            dtype = _stored_dtype(A_rD)
            if attn_factor != 1.0:
                B_Fr = B_Fr.to(torch.float64) * attn_factor
            prefix_attn = f"model.layers.{i}.self_attn.{proj}.lora"
            out[f"{prefix_attn}.lora_A.0"] = A_rD.to(dtype)[None].contiguous()  # (1, r, d_in)
            out[f"{prefix_attn}.lora_B.0"] = B_Fr.to(dtype)[None].contiguous()  # (1, d_out, r)
    return out


def from_mixlora(
    src: str | os.PathLike, dst: str | os.PathLike, base: nn.Module | str | os.PathLike | None = None
) -> MoEConfig:
    """Convert the MixLoRA adapter directory `src` into the moetune adapter directory `dst`.

    `base`: None writes the adapter from the MixLoRA files alone, without a base fingerprint (module
    docstring); a model (left as it was) or a local model directory builds it on that model: names,
    shapes and act_fn are checked and the fingerprint is recorded. Returns the adapter's MoEConfig.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such MixLoRA adapter directory")
    config_path = os.path.join(src, MIXLORA_CONFIG)
    mix = read_mixlora_config(_read_json(config_path), config_path)
    weights_path, tensors = _read_mixlora_tensors(src)
    layers = layers_from_mixlora(tensors, mix, weights_path)
    config = moe_config_from(mix, layers)
    attn_factor = 1.0
    if config.attn_r:  # MixLoRA scales attention LoRA by its own alpha and r; moetune by lora_alpha / attn_r
        attn_factor = mix.attn_scaling / _attn_scaling(config)
    converted = moetune_tensors(layers, attn_factor)
    if base is None:
        record = config.to_dict() | {
            "_base_model": mix.base_model,
            "_base_revision": None,
            # the versions entry of describe() (an empty module has nothing to fingerprint)
            "_versions": provenance.describe(nn.Module())["_versions"],
        }  # and no _base_fingerprint: there is no base to take it from
        publish_dir(dst, lambda d: _write_moetune(d, converted, record))
        return config
    model = _load_base(base) if isinstance(base, (str, os.PathLike)) else base
    if mix.act_fn is not None:
        _check_activation(model, mix.act_fn, config_path)
    _build_on_base(model, config, converted, weights_path, dst)
    return config


def _write_moetune(directory: str, tensors: dict[str, Tensor], record: dict[str, Any]) -> None:
    """The two files of `adapter_format.save_adapter` (format 1), from tensors and a config record."""
    text = json.dumps(record, indent=2, sort_keys=True)
    metadata = {
        "format": "pt",
        adapter_format.META_FORMAT: adapter_format.FORMAT_VERSION,
        adapter_format.META_CONFIG: text,
        adapter_format.META_SHA256: json.dumps(
            {k: adapter_format.tensor_sha256(t) for k, t in tensors.items()}, sort_keys=True
        ),
    }
    weights = os.path.join(directory, adapter_format.WEIGHTS_NAME)
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write_text(os.path.join(directory, CONFIG_NAME), text)


def _build_on_base(
    model: nn.Module, config: MoEConfig, tensors: dict[str, Tensor], where: str, dst: str
) -> None:
    """Inject into `model`, copy `tensors` (names and shapes checked), save_pretrained, eject again."""
    from moetune.core.injection import eject
    from moetune.model import MoEModel

    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    moe = MoEModel(model, config)
    try:
        adapter_format._copy_checked(moe, tensors, where)
        publish_dir(dst, moe.save_pretrained)
    finally:
        eject(model, trainable)


def _load_base(path: str | os.PathLike) -> nn.Module:
    """A local transformers model directory (no hub downloads, never remote code)."""
    from transformers import AutoModelForCausalLM

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such local model directory (the base model)")
    try:
        return AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as err:  # no config.json / weights, an unknown architecture
        raise ConversionError(f"{path}: cannot load the base model ({str(err).splitlines()[0]})") from None


# ---- activations --------------------------------------------------------------------------------------
_ACT_PROBE = torch.linspace(-8.0, 8.0, 321)


def ffn_activation(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The activation of the model's first feed-forward block moetune recognises."""
    for _, module in model.named_modules():
        spec = find_ffn_spec(module)
        if spec is not None and spec.family not in ("gated", "gated_fused"):
            raise ConversionError(
                f"{type(model).__name__}: its feed-forward blocks compute {spec.formula}; MixLoRA's experts "
                "compute down(act(gate(x)) * up(x))"
            )
        if spec is not None:
            return spec.activation(module)
    raise ConversionError(
        f"{type(model).__name__}: no feed-forward block of a known shape (gate_proj/up_proj/down_proj or "
        "gate_up_proj/down_proj), so no activation to give MixLoRA"
    )


def activation_name(act: Callable[[Tensor], Tensor]) -> str:
    """The first transformers ACT2FN name computing exactly `act` (on a grid of inputs)."""
    from transformers.activations import ACT2CLS, ACT2FN

    with torch.no_grad():
        y = act(_ACT_PROBE)
        for name in ACT2CLS:
            try:
                if torch.equal(ACT2FN[name](_ACT_PROBE), y):
                    return name
            except Exception:  # an activation with parameters or options of its own
                continue
    raise ConversionError(
        f"the base model's FFN activation {type(act).__name__} has no name in transformers' ACT2FN: "
        "give act_fn (--act-fn) yourself"
    )


def _check_activation(model: nn.Module, act_fn: str, where: str) -> None:
    from transformers.activations import ACT2FN

    with torch.no_grad():
        ours, theirs = ffn_activation(model)(_ACT_PROBE), ACT2FN[act_fn](_ACT_PROBE)
    if not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6):  # same function, maybe other rounding
        raise ConversionError(
            f"{where}: act_fn={act_fn!r} differs from the base model's FFN activation "
            f"({activation_name(ffn_activation(model))!r}); moetune's experts use the FFN's own activation"
        )


def _activation_of_base(base: nn.Module | str | os.PathLike | None, base_model: str, where: str) -> str:
    """MixLoRA's act_fn for an export: from `base` (a model or a model directory), else from the base
    the adapter records when its config is found locally (a directory or transformers' cache)."""
    if isinstance(base, nn.Module):
        return activation_name(ffn_activation(base))
    name = os.fspath(base) if base is not None else base_model
    if not name:
        raise ConversionError(
            f"{where}: records no base model, so MixLoRA's act_fn is unknown: give act_fn (--act-fn), "
            "e.g. 'silu' for Llama, Mistral, Qwen2 and Phi-3"
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConversionError(
            f"{where}: cannot read the config of base model {name!r} here ({str(err).splitlines()[0]}): give "
            "act_fn (--act-fn) or a local base model directory (--base)"
        ) from None
    with torch.device("meta"):  # the module tree without weights: the activation the FFN really uses
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    return activation_name(ffn_activation(skeleton))


# ---- moetune -> MixLoRA ---------------------------------------------------------------------------------
_MOE = {
    "gate": re.compile(r"model\.layers\.(\d+)\.mlp\.router\.weight_blocks\.0"),
    "bias": re.compile(r"model\.layers\.(\d+)\.mlp\.router\.expert_bias"),
    "expert": re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\w+)\.lora_([AB])\.0"),
    "attn": re.compile(r"model\.layers\.(\d+)\.self_attn\.(\w+)\.lora\.lora_([AB])\.0"),
}


def check_exportable(config: MoEConfig, where: str) -> None:
    """Refuse, naming the setting, a moetune adapter the MixLoRA format cannot hold."""
    task_routing = getattr(config, "task_routing", "none")
    cannot = [
        (
            config.expert_type != "ffn",
            f"expert_type={config.expert_type!r}: MixLoRA's experts are whole FFNs (expert_type='ffn'), "
            "one router per feed-forward block",
        ),
        (
            config.router != "topk",
            f"router={config.router!r}: MixLoRA ('mixlora' routing) sends each token to its top-k experts "
            "with renormalised weights (router='topk')",
        ),
        (
            isinstance(config.num_experts, list),
            f"num_experts={config.num_experts!r}: per-layer expert counts; MixLoRA has one num_experts",
        ),
        (
            config.asymmetric_experts,
            "asymmetric_experts=True: MixLoRA gives every expert its own LoRA A",
        ),
        (
            config.num_shared_experts > 0,
            f"num_shared_experts={config.num_shared_experts}: MixLoRA has no always-on shared experts",
        ),
        (
            bool(config.added_experts),
            f"{1 + len(config.added_experts)} task blocks of experts (add_experts): MixLoRA has one block "
            "of experts and no task routing",
        ),
        (task_routing != "none", f"task_routing={task_routing!r}: MixLoRA's router sees the token alone"),
        (
            bool(config.modules_to_save),
            f"modules_to_save={config.modules_to_save!r}: MixLoRA saves no trained copies of modules",
        ),
        (
            config.router_dtype != "float32",
            f"router_dtype={config.router_dtype!r}: MixLoRA computes the router in float32",
        ),
        (
            float(config.lora_alpha) != int(config.lora_alpha),
            f"lora_alpha={config.lora_alpha!r}: MixLoRA's config holds an integer lora_alpha",
        ),
    ]
    for refused, reason in cannot:
        if refused:
            raise ConversionError(f"{where}: cannot be written as MixLoRA: {reason}")


def layers_from_moetune(tensors: dict[str, Tensor], where: str) -> Layers:
    """The adapter tensors of a moetune `ffn`/`topk` adapter on a `*ForCausalLM`, by layer; refuses a
    tensor MixLoRA has no name for and a nonzero expert bias."""
    refuse = (
        "has no MixLoRA counterpart (MixLoRA names the router, FFN experts and attention LoRA of "
        "model.layers.{i} of a *ForCausalLM)"
    )
    groups = _group(tensors, _MOE, where, refuse)
    L = _num_layers({i for (i,) in groups["gate"]}, where, "routers")
    for (i,), bias in groups["bias"].items():
        if bool(bias.ne(0).any()):
            raise ConversionError(
                f"{where}: cannot be written as MixLoRA: the expert bias of layer {i} is nonzero "
                "(aux-loss-free balancing): MixLoRA selects experts by router probability alone"
            )
    layers = Layers([groups["gate"][(i,)] for i in range(L)], [{} for _ in range(L)], [{} for _ in range(L)])
    for kind, allowed in (("expert", FFN_PROJS), ("attn", ATTN_PROJS)):
        for i, proj, ab in sorted(groups[kind]):
            if proj not in allowed or i >= L:
                what = "experts" if kind == "expert" else "attention LoRA"
                raise ConversionError(
                    f"{where}: cannot be written as MixLoRA: {what} on {proj} of layer {i}: MixLoRA names "
                    f"{list(allowed)} of layers 0..{L - 1}"
                )
            if ab == "A":
                A, B = groups[kind][(i, proj, "A")], groups[kind].get((i, proj, "B"))
                if B is None:
                    raise ConversionError(f"{where}: the B of {proj} in layer {i} is missing")
                target = layers.experts if kind == "expert" else layers.attention
                target[i][proj] = (A, B) if kind == "expert" else (A[0], B[0])  # (1, r, d) -> (r, d)
    layers.check(where)
    return layers


def mixlora_tensors(layers: Layers) -> dict[str, Tensor]:
    """`layers` under MixLoRA's names (each tensor its own contiguous copy, as torch.save stores views'
    whole storage)."""
    out: dict[str, Tensor] = {}
    for i, gate_ED in enumerate(layers.gates):
        out[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = gate_ED.detach().clone()
        for proj, (A_ErD, B_EFr) in layers.experts[i].items():
            for j in range(A_ErD.shape[0]):
                name = f"mixlora.layers.{i}.mlp.{proj}.experts.{j}"
                out[f"{name}.lora_A.weight"] = A_ErD[j].clone()  # (r, d_in)
                out[f"{name}.lora_B.weight"] = B_EFr[j].clone()  # (d_out, r)
        for proj, (A_rD, B_Fr) in layers.attention[i].items():
            out[f"mixlora.layers.{i}.self_attn.{proj}.lora_A.weight"] = A_rD.clone()
            out[f"mixlora.layers.{i}.self_attn.{proj}.lora_B.weight"] = B_Fr.clone()
    return out


def mixlora_config_from(config: MoEConfig, layers: Layers, act_fn: str, base_model: str) -> dict[str, Any]:
    """adapter_config.json for a checked moetune adapter. Attention LoRA of another rank than the experts
    goes in MoE-PEFT's expert_lora (the experts' r, alpha, dropout; the top level is attention's)."""
    attn = _ordered(set(layers.attention[0]), ATTN_PROJS)
    alpha = int(config.lora_alpha)
    data: dict[str, Any] = {
        "base_model_name_or_path": base_model,
        "task_type": "CAUSAL_LM",
        "peft_type": "MIXLORA",
        "bias": "none",
        "r": config.attn_r if attn else config.r,
        "lora_alpha": alpha,
        "lora_dropout": float(config.lora_dropout),
        "target_modules": [*attn, *_ordered(set(layers.experts[0]), FFN_PROJS)],
        "routing_strategy": "mixlora",
        "num_experts": layers.gates[0].shape[0],
        "top_k": config.top_k,
        "act_fn": act_fn,
        "jitter_noise": float(config.router_jitter),
        "router_init_range": ROUTER_INIT_RANGE,
        # MoE-PEFT's Mixtral balance loss is top_k times moetune's Switch loss
        "router_aux_loss_coef": float(config.aux_loss_coef) / config.top_k,
        "router_loss": config.aux_loss_coef > 0,
    }
    if config.use_rslora:
        data["use_rslora"] = True
    if attn and config.attn_r != config.r:
        data["expert_lora"] = {"r": config.r, "lora_alpha": alpha, "lora_dropout": float(config.lora_dropout)}
    return data


def to_mixlora(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    act_fn: str | None = None,
    base: nn.Module | str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Convert the moetune adapter directory `src` into the MixLoRA adapter directory `dst`
    (adapter_config.json + adapter_model.bin); returns the config written.

    act_fn: MixLoRA's name of the FFN activation (it must be written: the mixlora package does not fall
    back to the FFN's own); None takes it from `base` (a model or a local model directory), else from the
    base model the adapter records when its config is found locally. Refuses (ConversionError) what
    MixLoRA cannot hold: see `check_exportable`, plus a nonzero expert bias and tensors MixLoRA cannot name.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such moetune adapter directory")
    where = os.path.join(src, adapter_format.WEIGHTS_NAME)
    metadata, tensors = adapter_format.read_weights(where)
    config, extras = adapter_format.read_config(src, metadata)
    check_exportable(config, where)
    layers = layers_from_moetune(tensors, where)
    from transformers.activations import ACT2CLS

    if act_fn is None:
        act_fn = _activation_of_base(base, extras.get("_base_model") or "", where)
    elif act_fn not in ACT2CLS:
        raise ConversionError(f"act_fn={act_fn!r}: must be a name in transformers' ACT2FN: {sorted(ACT2CLS)}")
    data = mixlora_config_from(config, layers, act_fn, extras.get("_base_model") or "")
    _warn_dropped(config, data, where)
    weights = mixlora_tensors(layers)

    def save_weights(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # torch.save names its zip archive after a path (".tmp-..." fails)
            torch.save(weights, fh)

    def write(directory: str) -> None:
        atomic_write(os.path.join(directory, MIXLORA_WEIGHTS), save_weights)
        atomic_write_text(os.path.join(directory, MIXLORA_CONFIG), json.dumps(data, indent=2))

    publish_dir(dst, write)
    return data


def _warn_dropped(config: MoEConfig, data: dict[str, Any], where: str) -> None:
    """Warn about training settings MixLoRA has no field for, and about what the mixlora package
    (0.2.3) reads otherwise than MoE-PEFT."""
    dropped = {
        name: getattr(config, name)
        for name in ("z_loss_coef", "importance_loss_coef", "contrastive_loss_coef", "bias_update_rate")
        if getattr(config, name) > 0
    }
    if dropped:
        warnings.warn(
            f"{where}: training settings MixLoRA has no field for, not written: {dropped}", stacklevel=3
        )
    notes = []
    if data["lora_dropout"] == 0:
        notes.append("lora_dropout is 0, which it refuses (it asserts lora_dropout > 0)")
    if "expert_lora" in data:
        notes.append(
            f"it ignores expert_lora, so attention rank {config.attn_r} != expert rank {config.r} fails"
        )
    if data["jitter_noise"] > 0:
        notes.append("it applies jitter_noise at inference too")
    if notes:
        warnings.warn(f"{where}: the mixlora package 0.2.3 (not MoE-PEFT): {'; '.join(notes)}", stacklevel=3)
