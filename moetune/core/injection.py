"""Find the modules a `MoEConfig` targets in a Hugging Face model and wrap them.

Wrapping replaces a module by a moetune module that holds the original as `base_layer` (the peft
convention); nothing else in the model changes. Every error names the offending value and what the
model offers instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from moetune.config import MoEConfig
from moetune.core.architectures import (
    ATTENTION_SUFFIXES,
    FFN_SPECS,
    SPLIT_FFN_TARGETS,
    decomposition_error,
    find_ffn_spec,
    in_language_model,
    is_linear_like,
    is_quantized,
    layer_index,
    name_matches,
)
from moetune.core.context import RoutingContext
from moetune.core.layers import AdapterLayer, LoRALinear, MoEFFN, MoELinear, TrainableCopy


@dataclass
class InjectionPlan:
    ffn: dict[str, object] = field(default_factory=dict)  # MLP path -> FFNSpec
    ffn_projections: list[str] = field(default_factory=list)  # projections carrying expert LoRA
    linear: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)
    save: list[str] = field(default_factory=list)
    experts: dict[str, int] = field(default_factory=dict)  # routed experts per MoE module


def num_layers_of(model: nn.Module) -> int:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    if n is None:
        raise ValueError(
            "cannot find num_hidden_layers in the model config (needed for per-layer expert counts)"
        )
    return int(n)


def plan(model: nn.Module, cfg: MoEConfig, check_ffn: bool = True) -> InjectionPlan:
    """What `inject` will wrap; raises, naming the problem, before anything changes. `check_ffn`: run
    the feed-forward blocks taken for `ffn` layers both ways on a small input (their forward and
    moetune's decomposition with no expert), one block per structure, refusing one that computes
    something else."""
    modules = dict(model.named_modules())
    adapted = next((n for n, m in modules.items() if isinstance(m, AdapterLayer)), None)
    if adapted is not None:
        raise ValueError(
            f"module {adapted!r} is already a moetune {type(modules[adapted]).__name__}: this model already "
            "carries moetune adapters (get_moe_model injects in place); call it on a fresh base model, or "
            "use the MoEModel you have (add_experts adds experts for a new task)"
        )
    linears = [n for n, m in modules.items() if is_linear_like(m)]
    result = InjectionPlan()

    if cfg.expert_type == "ffn":
        result.ffn = {n: s for n, m in modules.items() if in_language_model(n) and (s := find_ffn_spec(m))}
        checked: dict[tuple, str | None] = {}
        for name, spec in result.ffn.items() if check_ffn else ():
            # one block per structure: blocks of one class with the same kinds of children compute the
            # same function of their weights (SmolLM2-135M: 1 check instead of 30)
            block = modules[name]
            key = (type(block), spec, tuple((n, type(c)) for n, c in block.named_children()))
            if key not in checked:
                checked[key] = decomposition_error(block, spec)
            problem = checked[key]
            if problem is not None:
                raise ValueError(
                    f"{name} ({type(modules[name]).__name__}) has the projections of a {spec.family} "
                    f"feed-forward block but does not compute {spec.formula}: {problem}. moetune's 'ffn' "
                    "experts would change this model's outputs. Use expert_type='linear' (routed LoRA "
                    "experts on its linear layers, the block itself untouched)."
                )
        if not result.ffn:
            shapes = ", ".join("/".join(spec.projections) for spec in FFN_SPECS)
            routed = _routed_experts(model)
            base = (
                f"this is a mixture-of-experts base ({routed}): its feed-forward blocks are routed experts, "
                "and moetune's 'ffn' experts attach to dense feed-forward blocks and shared experts only; "
                if routed
                else ""
            )
            raise ValueError(
                f"expert_type='ffn' found no feed-forward block of a known shape ({shapes}) in this model; "
                f"{base}use expert_type='linear' (routed LoRA experts on linear layers: by default every "
                "linear layer of the decoder blocks) and/or attn_r. Linear layers here: "
                f"{_short_names(linears)}"
            )
        allowed = sorted({p for s in result.ffn.values() for p in s.projections})
        wanted = cfg.target_modules if cfg.target_modules is not None else allowed
        if isinstance(wanted, str) or not set(wanted) <= set(allowed):
            raise ValueError(
                f"target_modules={wanted!r}: with expert_type='ffn' name FFN projections of this model, "
                f"allowed {allowed}"
            )
        result.ffn_projections = list(wanted)
        expert_owned = {f"{mlp}.{p}" for mlp, spec in result.ffn.items() for p in spec.projections}
    else:
        targets = (
            cfg.target_modules
            if cfg.target_modules is not None
            else _default_linear_targets(model, modules, cfg)
        )
        scope = in_language_model if cfg.target_modules is None else (lambda _n: True)
        result.linear = [n for n in linears if scope(n) and name_matches(n, targets)]
        if not result.linear:
            raise ValueError(
                f"target_modules={targets!r} matches no linear layer; linear layers here: "
                f"{_short_names(linears)}"
            )
        expert_owned = set(result.linear)

    if cfg.attn_r > 0:
        targets = cfg.attn_target_modules if cfg.attn_target_modules is not None else list(ATTENTION_SUFFIXES)
        scope = in_language_model if cfg.attn_target_modules is None else (lambda _n: True)
        result.attention = [n for n in linears if scope(n) and name_matches(n, targets)]
        if not result.attention:
            raise ValueError(
                f"attn_target_modules={targets!r} matches no linear layer; linear layers here: "
                f"{_short_names(linears)}"
            )
        twice = sorted(set(result.attention) & expert_owned)
        if twice:
            raise ValueError(
                f"module {twice[0]!r} is targeted twice: by the experts (target_modules) and by attn_r LoRA "
                "(attn_target_modules); a module may carry one adapter: remove it from one of them"
            )

    for name in cfg.modules_to_save:
        hits = [n for n in modules if n and name_matches(n, [name])]
        if not hits:
            raise ValueError(
                f"modules_to_save: {name!r} matches no module; top-level modules: {_top(modules)}"
            )
        result.save += hits
    adapted = [*result.ffn, *result.linear, *result.attention]
    for saved in result.save:
        clash = next(
            (a for a in adapted if a == saved or a.startswith(saved + ".") or saved.startswith(a + ".")), None
        )
        if clash is not None:
            raise ValueError(
                f"modules_to_save: {saved!r} overlaps {clash!r}, which already carries experts or LoRA; "
                "a module may carry one adapter: save a module outside the adapted ones (e.g. lm_head)"
            )
    # per-layer expert counts, checked before anything is changed
    n_layers = num_layers_of(model) if isinstance(cfg.num_experts, list) else 0
    for name in [*result.ffn, *result.linear]:
        result.experts[name] = cfg.experts_in_layer(layer_index(name) if n_layers else 0, n_layers)
    return result


def inject(model: nn.Module, cfg: MoEConfig, ctx: RoutingContext, check_ffn: bool = True) -> InjectionPlan:
    """Freeze `model` and wrap what `cfg` targets, in place (`check_ffn`: see `plan`)."""
    todo = plan(model, cfg, check_ffn)  # raises before anything changes
    model.requires_grad_(False)
    for name in todo.attention:
        _replace(
            model,
            name,
            lambda m: LoRALinear(
                m, cfg.attn_r, cfg.lora_alpha / _attn_div(cfg), cfg.lora_dropout, ctx, cfg.adapter_dtype
            ),
        )
    for name, spec in todo.ffn.items():
        E = todo.experts[name]
        projs = [p for p in todo.ffn_projections if p in spec.projections]
        _replace(model, name, lambda m, s=spec, e=E, n=name, t=projs: MoEFFN(m, s, t, cfg, e, ctx, n))
    for name in todo.linear:
        E = todo.experts[name]
        _replace(model, name, lambda m, e=E, n=name: MoELinear(m, cfg, e, ctx, n))
    for name in todo.save:
        _replace(model, name, lambda m: TrainableCopy(m, ctx))
    return todo


def eject(model: nn.Module, trainable: dict[str, bool]) -> None:
    """Undo `inject`: put every wrapped module back and restore the requires_grad flags."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    for name in reversed(wrapped):  # innermost first
        wrapper = model.get_submodule(name)
        _replace(model, name, lambda m: m.get_base_layer())
        del wrapper
    for name, p in model.named_parameters():
        p.requires_grad_(trainable.get(name, p.requires_grad))


def _attn_div(cfg: MoEConfig) -> float:
    return cfg.attn_r**0.5 if cfg.use_rslora else cfg.attn_r


def _replace(model: nn.Module, name: str, wrap) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, wrap(getattr(parent, child)))


def _default_linear_targets(
    model: nn.Module, modules: dict[str, nn.Module], cfg: MoEConfig
) -> list[str] | str:
    """The FFN projections of known shapes; in a family without one, every linear layer of the decoder
    blocks (peft's "all-linear": not the output head), less the attention projections when attn_r
    puts plain LoRA there."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in SPLIT_FFN_TARGETS:
        return SPLIT_FFN_TARGETS[model_type]
    ffn = [
        f"{n}.{p}"
        for n, m in modules.items()
        if in_language_model(n) and (s := find_ffn_spec(m))
        for p in s.projections
    ]
    if ffn:
        return ffn
    attention = cfg.attn_target_modules if cfg.attn_target_modules is not None else list(ATTENTION_SUFFIXES)
    return [
        n
        for n, m in modules.items()
        if is_linear_like(m)
        and in_language_model(n)
        and _in_a_block(n)
        and _computes_a_linear(m)
        and not (cfg.attn_r > 0 and name_matches(n, attention))
    ]


def _computes_a_linear(module: nn.Module) -> bool:
    """nn.Linear's own forward, or a quantized linear's; not a subclass that computes something else
    (the MoE routers of Llama 4 and PhiMoE subclass nn.Linear and return a tuple)."""
    own = type(module).forward is nn.Linear.forward or type(module).__name__ == "Conv1D"
    return own or is_quantized(module.weight)


def _routed_experts(model: nn.Module) -> str:
    """'<field>=<n>' when the model's config declares routed experts (an MoE base), else ''."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 1:
            return f"{key}={n}"
    return ""


def _in_a_block(name: str) -> bool:
    """Inside a numbered layer (`model.layers.3.mlp.fc1`), not the embeddings or the output head."""
    try:
        layer_index(name)
    except ValueError:
        return False
    return True


def _short_names(names: list[str]) -> list[str]:
    """Distinct dotted suffixes with layer numbers folded: `model.layers.0.mlp.up_proj` -> `mlp.up_proj`."""
    out = []
    for n in names:
        parts = n.split(".")
        tail = ".".join(parts[-2:]) if len(parts) > 1 else n
        if tail not in out:
            out.append(tail)
    return out


def _top(modules: dict[str, nn.Module]) -> list[str]:
    return sorted({n.split(".")[0] for n in modules if n})
