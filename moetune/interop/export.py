"""Export an `ffn` top-k adapter as a plain transformers MoE checkpoint, servable without moetune.

An `ffn` MoE layer (MixLoRA) computes  FFN(x) + sum_i g_i (FFN_i(x) - FFN(x)),  where expert i is the
frozen FFN with W + s B_i A_i on its projections. With top-k routing the g_i are the k largest softmax
probabilities renormalised to sum 1, so the layer equals  sum_i g_i FFN_i(x):  a sparse MoE block whose
experts are full FFNs with the LoRA merged in. transformers has that block:

  mixtral    (Jiang et al. 2024, `MixtralForCausalLM`) from a Llama or Mistral base. Its router
             (`MixtralTopKRouter`, transformers 5.x) is  softmax(x W_g^T) -> top-k -> divide by their sum,
             moetune's `topk` router; its experts are act(x G_i^T) * (x U_i^T) -> D_i, the Llama MLP.
             The decoder layer (RMSNorm, rotary attention with GQA and optional sliding window) is
             Mistral's, which is Llama's without biases.
  qwen2_moe  (`Qwen2MoeForCausalLM`) from a Qwen2 base: the same routed block (with norm_topk_prob=True)
             plus a sigmoid-gated shared expert, written as one all-zero expert (intermediate size 1)
             so that it adds exactly 0; Qwen2's q/k/v biases carry over (qkv_bias=True).

What the checkpoint holds: expert i of layer l = the base FFN with expert i's LoRA merged into each
targeted projection (untargeted projections are the base's); the router weight = moetune's router
rows; attention LoRA (`attn_r`) merged into its projections; `modules_to_save` as trained. Merges are
computed in float64 (float32 over a bf16/fp16 base) and rounded once to the export dtype.

Precision. moetune computes router logits in `router_dtype` (float32) from the hidden state cast to
float32; the exported router computes them in the checkpoint's dtype (transformers takes the softmax
in float32). In a float32 export the two agree to rounding; in a bf16 export the router weight and
the logits are rounded to bf16 (about 3 significant digits), so a token whose k-th and (k+1)-th expert
probabilities are that close may pick the other expert, and the mixing weights differ at bf16 rounding.

Refused (`ExportError`, naming the reason): routers other than `topk` (Mixtral cannot express top-p,
dense, capacity or threshold routing), shared experts, a nonzero aux-loss-free expert bias (it changes
the selection but not the weights), expert counts that differ between layers, `linear` experts, a
layer without experts, bases with MLP or attention biases the target lacks, quantized bases, other
model families.

Tasks: by default every task's experts are exported, in order of creation (router index = position),
and routing is among all of them, as moetune routes without `use_tasks` / `task_ids`. `tasks=[...]`
exports only those tasks' experts: the exported model then routes exactly as `use_tasks(tasks)`.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moetune.core.architectures import is_quantized
from moetune.core.layers import AdapterLayer, LoRALinear, MoEFFN, TrainableCopy
from moetune.core.routing import DTYPES
from moetune.core.tasks import blocks_of, task_index
from moetune.io.atomic import publish_dir
from moetune.model import MoEModel

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


class ExportError(ValueError):
    """The adapter or its base has something the target architecture cannot express."""


# ---- merging one LoRA into a weight ---------------------------------------------------------------
def merge_lora(
    weight: Tensor, A_rD: Tensor, B_Fr: Tensor, scaling: float, *, fan_in_fan_out: bool = False
) -> Tensor:
    """W + s B A (Hu et al. 2021) in float64 (float32 for a half-precision W), not yet rounded.

    `weight` is (d_out, d_in) for nn.Linear, (d_in, d_out) for transformers' Conv1D (`fan_in_fan_out`,
    peft's name for it): the delta is then transposed.
    """
    work = torch.float64 if weight.dtype in (torch.float32, torch.float64) else torch.float32
    delta_FD = (B_Fr.to(work) @ A_rD.to(work)) * scaling  # (d_out, d_in)
    return weight.detach().to(work) + (delta_FD.T if fan_in_fan_out else delta_FD)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def merged_base_tensors(model: MoEModel) -> dict[str, Tensor]:
    """Every base parameter under its name before injection, with what the adapter changes there:
    attention LoRA merged (float64/float32, unrounded), `modules_to_save` as trained. MoE blocks keep
    their frozen weights (the experts are built from them). Tied parameters stay one tensor object."""
    out: dict[str, Tensor] = {}
    detached: dict[int, Tensor] = {}  # id(parameter) -> its detached tensor: tied names share one

    def walk(module: nn.Module, prefix: str) -> None:
        if isinstance(module, TrainableCopy):
            return walk(module.trained, prefix)
        if isinstance(module, AdapterLayer):
            walk(module.get_base_layer(), prefix)
            if isinstance(module, LoRALinear):
                (A_1rD, B_1Fr), *_ = zip(module.lora.lora_A, module.lora.lora_B, strict=True)
                out[prefix + "weight"] = merge_lora(
                    out[prefix + "weight"],
                    A_1rD[0],
                    B_1Fr[0],
                    module.lora.scaling,
                    fan_in_fan_out=_is_conv1d(module.base_layer),
                )
            return None
        for name, p in module.named_parameters(recurse=False):
            out[prefix + name] = detached.setdefault(id(p), p.detach())
        for name, child in module.named_children():
            walk(child, f"{prefix}{name}.")
        return None

    walk(model.base_model, "")
    return out


# ---- what gets exported -----------------------------------------------------------------------------
@dataclass
class ExpertLayer:
    """One MoE layer as the target stores it: E' experts of a gated FFN and the router rows."""

    gate_EFD: Tensor  # (E', F, D)
    up_EFD: Tensor  # (E', F, D)
    down_EDF: Tensor  # (E', D, F)
    router_ED: Tensor  # (E', D)


def _selected_experts(layer: MoEFFN, blocks: tuple[int, ...]) -> tuple[list[int], Tensor]:
    """Bank indices of the experts of task `blocks` (block order) and their router rows (E', D)."""
    ranges = layer.router.block_ranges(blocks)
    index = [e for start, n in ranges for e in range(start, start + n)]
    rows = torch.cat([layer.router.weight_blocks[b].detach() for b in blocks])
    return index, rows


def expert_layer(
    layer: MoEFFN, base: dict[str, Tensor], path: str, blocks: tuple[int, ...], dtype
) -> ExpertLayer:
    """Expert i = the block's FFN with expert i's LoRA merged into each targeted projection."""
    index, router_ED = _selected_experts(layer, blocks)
    per_proj: dict[str, Tensor] = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        W = base[f"{path}.{proj}.weight"]
        bank = dict(layer.experts).get(proj)
        if bank is None:  # untargeted: every expert has the base weight
            per_proj[proj] = W.to(dtype).unsqueeze(0).expand(len(index), -1, -1).clone()
            continue
        merged = [
            merge_lora(W, *(t.detach() for t in bank.expert_weights(e)), bank.scaling).to(dtype)
            for e in index
        ]
        per_proj[proj] = torch.stack(merged)
    return ExpertLayer(per_proj["gate_proj"], per_proj["up_proj"], per_proj["down_proj"], router_ED.to(dtype))


@dataclass(frozen=True)
class Target:
    """A transformers MoE architecture moetune can export to."""

    name: str
    model_class: str  # in transformers
    config_class: str
    sources: tuple[str, ...]  # base model_type values whose decoder layer the target shares
    copied_config: tuple[str, ...]  # base config fields carried over as they are
    allowed_bias: tuple[str, ...]  # base bias tensors (name suffixes) the target also has
    moe_config: Callable[[Any, int, int, Any], dict[str, Any]]  # (base config, E, k, MoEConfig) -> fields
    mlp_tensors: Callable[[ExpertLayer], dict[str, Tensor]]  # names under `<layer>.mlp.` -> tensor


_COMMON_CONFIG = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "rope_parameters",
    "attention_dropout",
)


def _mixtral_mlp(x: ExpertLayer) -> dict[str, Tensor]:
    # MixtralExperts (transformers 5.x) stores gate and up fused: gate_up_proj[e] = [G_e; U_e] (2I, D);
    # its save_pretrained writes the per-expert w1/w3/w2 layout of the original Mixtral checkpoints.
    return {
        "gate.weight": x.router_ED,
        "experts.gate_up_proj": torch.cat([x.gate_EFD, x.up_EFD], 1),
        "experts.down_proj": x.down_EDF,
    }


def _qwen2_moe_mlp(x: ExpertLayer) -> dict[str, Tensor]:
    D = x.router_ED.shape[1]
    zeros = x.router_ED.new_zeros
    return _mixtral_mlp(x) | {  # the same routed block, and a shared expert that adds exactly 0
        "shared_expert.gate_proj.weight": zeros(1, D),
        "shared_expert.up_proj.weight": zeros(1, D),
        "shared_expert.down_proj.weight": zeros(D, 1),
        "shared_expert_gate.weight": zeros(1, D),
    }


TARGETS = {
    "mixtral": Target(
        "mixtral",
        "MixtralForCausalLM",
        "MixtralConfig",
        sources=("llama", "mistral"),
        copied_config=(*_COMMON_CONFIG, "head_dim", "sliding_window"),
        allowed_bias=(),
        moe_config=lambda base, E, k, cfg: dict(
            num_local_experts=E,
            num_experts_per_tok=k,
            router_jitter_noise=0.0,
            output_router_logits=False,
            # transformers' Mixtral load-balancing loss is k x moetune's Switch loss
            router_aux_loss_coef=cfg.aux_loss_coef / k,
        ),
        mlp_tensors=_mixtral_mlp,
    ),
    "qwen2_moe": Target(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        sources=("qwen2",),
        copied_config=(
            *_COMMON_CONFIG,
            "use_sliding_window",
            "sliding_window",
            "max_window_layers",
            "layer_types",
        ),
        allowed_bias=("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        moe_config=lambda base, E, k, cfg: dict(
            num_experts=E,
            num_experts_per_tok=k,
            moe_intermediate_size=base.intermediate_size,
            norm_topk_prob=True,  # renormalised top-k: moetune's topk router
            shared_expert_intermediate_size=1,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=True,
            output_router_logits=False,
            router_aux_loss_coef=cfg.aux_loss_coef / k,
        ),
        mlp_tensors=_qwen2_moe_mlp,
    ),
}


# ---- checks ---------------------------------------------------------------------------------------
def _task_blocks(model: MoEModel, tasks: Iterable[str] | None) -> tuple[int, ...]:
    """The expert blocks `tasks` route among, as under `use_tasks(tasks)` (None: every block)."""
    cfg = model.moe_config
    every = tuple(range(1 + len(cfg.added_experts)))
    if tasks is None:
        return every
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ExportError(f"tasks=[]: name at least one task; tasks: {model.tasks}")
    try:
        blocks = blocks_of(cfg, [task_index(cfg, name, "tasks") for name in names])
    except ValueError as err:
        raise ExportError(str(err)) from None
    return every if blocks is None else blocks


def check_exportable(model: MoEModel, target: Target, blocks: tuple[int, ...]) -> dict[str, MoEFFN]:
    """Raise `ExportError` naming the first thing `target` cannot express; return the MoE layers."""
    cfg, to = model.moe_config, target.name
    base = model.base_model
    config = base.config
    model_type = getattr(config, "model_type", "?")
    if model_type not in target.sources or not type(base).__name__.endswith("ForCausalLM"):
        other = [t.name for t in TARGETS.values() if model_type in t.sources]
        hint = f" (use --to {other[0]})" if other else ""
        raise ExportError(
            f"base {type(base).__name__} (model_type={model_type!r}): {to} export needs a causal LM of "
            f"family {' or '.join(target.sources)}, whose decoder layer {to} shares{hint}"
        )
    quantized = any(is_quantized(p) for p in base.parameters())  # also quantized after loading (torchao)
    if getattr(config, "quantization_config", None) is not None or quantized:
        raise ExportError(
            "the base model is quantized: LoRA cannot be merged into quantized weights; load the base "
            "unquantized (float32/bf16) for the export"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ExportError(f"base has {flag}=True: {to}'s attention and experts have no biases")
    if cfg.expert_type != "ffn":
        raise ExportError(
            f"expert_type={cfg.expert_type!r}: {to}'s experts are whole FFNs, which only expert_type='ffn' "
            "(one router per FFN, experts = FFN with LoRA) gives; per-linear routers cannot be expressed"
        )
    if cfg.router != "topk":
        raise ExportError(
            f"router={cfg.router!r}: {to} routes softmax -> top-k -> renormalise, which is moetune's "
            "'topk' router only"
        )
    if cfg.task_routing != "none":
        raise ExportError(
            f"task_routing={cfg.task_routing!r}: the router reads a learned task embedding, which {to}'s "
            "router (a linear map of the token alone, no bias) cannot express"
        )
    if cfg.num_shared_experts:
        raise ExportError(
            f"num_shared_experts={cfg.num_shared_experts}: {to} has no always-on expert with weight 1"
        )
    layers = dict(model.moe_layers())
    if any(not isinstance(layer, MoEFFN) for layer in layers.values()):
        raise ExportError(f"{to} export needs expert_type='ffn' MoE layers only")
    counts = {path: sum(n for _, n in layer.router.block_ranges(blocks)) for path, layer in layers.items()}
    if len(set(counts.values())) > 1:
        raise ExportError(
            f"expert counts differ between layers ({sorted(set(counts.values()))}, num_experts="
            f"{cfg.num_experts!r}): {to} has the same number of experts in every layer"
        )
    n_layers = config.num_hidden_layers
    expected = {f"model.layers.{i}.mlp" for i in range(n_layers)}
    if set(layers) != expected:
        missing = sorted(expected - set(layers)) or sorted(set(layers) - expected)
        raise ExportError(f"every decoder layer's mlp must carry experts for {to}; not so for {missing[0]!r}")
    for path, layer in layers.items():
        if layer.spec.family != "gated":
            raise ExportError(f"{path}: a {layer.spec.family!r} FFN; {to} experts are gate/up/down MLPs")
        if layer.use_bias:
            bias_E = torch.cat(
                [layer.router.expert_bias[s : s + n] for s, n in layer.router.block_ranges(blocks)]
            )
            if bool(bias_E.any()):
                raise ExportError(f"{path}: {nonzero_bias_refusal(to, cfg.bias_update_rate)}")
    return layers


# ---- the export ---------------------------------------------------------------------------------
def _export_dtype(model: MoEModel, dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return model.base_model.get_input_embeddings().weight.dtype
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f"dtype={dtype!r}: allowed {', '.join(map(repr, DTYPES))}")
        return DTYPES[dtype]
    return dtype


def export_state(model: MoEModel, to: str = "mixtral", *, tasks: Iterable[str] | None = None, dtype=None):
    """(target model class, its config, its state dict) for `model`, without writing anything."""
    import transformers

    if not isinstance(model, MoEModel):
        raise TypeError(f"expected a moetune MoEModel, got {type(model).__name__}")
    if to not in TARGETS:
        raise ExportError(f"to={to!r}: allowed {', '.join(map(repr, TARGETS))}")
    target = TARGETS[to]
    blocks = _task_blocks(model, tasks)
    layers = check_exportable(model, target, blocks)
    dtype = _export_dtype(model, dtype)
    cfg, base_config = model.moe_config, model.base_model.config
    base = merged_base_tensors(model)
    E = sum(n for _, n in next(iter(layers.values())).router.block_ranges(blocks))
    k = min(cfg.top_k, E)  # as the router: a task that owns fewer than k experts uses them all

    tied = bool(getattr(base_config, "tie_word_embeddings", False)) and (
        base.get("lm_head.weight") is base.get("model.embed_tokens.weight")
    )  # a trained or LoRA-merged head or embedding unties them
    fields = {f: getattr(base_config, f) for f in target.copied_config if hasattr(base_config, f)}
    fields |= target.moe_config(base_config, E, k, cfg) | {"tie_word_embeddings": tied, "dtype": dtype}
    config = getattr(transformers, target.config_class)(**fields)
    cls = getattr(transformers, target.model_class)

    with torch.device("meta"):
        shapes = {name: t.shape for name, t in cls(copy.deepcopy(config)).state_dict().items()}
    state: dict[str, Tensor] = {}
    for path, layer in layers.items():
        experts = expert_layer(layer, base, path, blocks, dtype)
        for name, tensor in target.mlp_tensors(experts).items():
            state[f"{path}.{name}"] = tensor
        for proj in ("gate_proj", "up_proj", "down_proj"):
            base.pop(f"{path}.{proj}.weight")
    for name, tensor in base.items():
        if name not in shapes:
            allowed = any(name.endswith(suffix) for suffix in target.allowed_bias)
            what = "a bias" if name.endswith(".bias") and not allowed else "a tensor"
            raise ExportError(f"base has {what} {name!r} {tuple(tensor.shape)} that {to} has no place for")
        state[name] = tensor.to(dtype)
    if tied:
        state.pop("lm_head.weight", None)
    storages: set[int] = set()
    for name, tensor in state.items():  # safetensors would drop all but one name of shared storage
        if tensor.untyped_storage().data_ptr() in storages:
            state[name] = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
    missing = sorted(set(shapes) - set(state) - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise ExportError(f"{to} needs {missing[0]!r}, which the base model does not have")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise ExportError(
                f"{name}: shape {tuple(tensor.shape)} from the base, {to} expects {tuple(shapes[name])}"
            )
    return cls, config, state


@torch.no_grad()
def export_moe(
    model: MoEModel,
    out_dir: str | os.PathLike,
    to: str = "mixtral",
    *,
    tasks: Iterable[str] | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> str:
    """Write `model` (an `ffn` top-k MoEModel) as a transformers `to` checkpoint directory; returns it.

    `to`: "mixtral" (Llama/Mistral base) or "qwen2_moe" (Qwen2 base). `tasks`: export only these tasks'
    experts (default: all, in order of creation). `dtype`: of the checkpoint (default: the base's).
    `tokenizer`: a directory whose tokenizer files are copied, or a tokenizer (its `save_pretrained`).
    The directory appears complete or not at all (written beside it, then renamed); an existing non-empty
    `out_dir` is an error unless `overwrite`.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ExportError(
            f"{out_dir}: exists and is not an empty directory (pass overwrite=True to replace it)"
        )
    cls, config, state = export_state(model, to, tasks=tasks, dtype=dtype)
    with torch.device("meta"):
        exported = cls(config)
    exported.load_state_dict(state, strict=False, assign=True)  # tied lm_head: tie_weights below
    if config.tie_word_embeddings:
        exported.tie_weights()
    generation = getattr(model.base_model, "generation_config", None)
    if generation is not None:
        exported.generation_config = copy.deepcopy(generation)

    publish_model(exported, tokenizer, out_dir)
    return out_dir


def publish_model(model: nn.Module, tokenizer: Any, out_dir: str) -> None:
    """`model.save_pretrained` and the tokenizer (an object, or a directory whose tokenizer files are
    copied) into `out_dir`, which appears whole: written beside it, then renamed over it."""

    def write(directory: str) -> None:
        model.save_pretrained(directory)
        _write_tokenizer(tokenizer, directory)

    publish_dir(out_dir, write)


def export_mixtral(model: MoEModel, out_dir: str | os.PathLike, **kwargs: Any) -> str:
    """`export_moe(model, out_dir, "mixtral", ...)`: a `MixtralForCausalLM` checkpoint."""
    return export_moe(model, out_dir, "mixtral", **kwargs)


def _write_tokenizer(tokenizer: Any, directory: str) -> None:
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, os.PathLike)):
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(directory, name))
        return
    tokenizer.save_pretrained(directory)


# ---- the CLI's entry --------------------------------------------------------------------------------
def nonzero_bias_refusal(to: str, rate: float) -> str:
    return (
        f"nonzero expert bias (aux-loss-free balancing, bias_update_rate={rate}): it changes which experts "
        f"are selected, which {to}'s router cannot express; to export, train with --bias-update-rate 0 "
        "(the aux loss balances alone), or serve the adapter with moetune"
    )


def check_adapter_exportable(adapter: str, to: str) -> None:
    """What the adapter's own files can tell before a base model loads: no nonzero expert bias."""
    from safetensors import safe_open

    from moetune.io.adapter import WEIGHTS_NAME, read_config

    weights = os.path.join(adapter, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        return  # demo.load_for_export names what is missing
    cfg, _ = read_config(adapter)
    with safe_open(weights, framework="pt") as fh:
        for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if name.endswith("expert_bias") and bool(fh.get_tensor(name).any()):
                raise ExportError(f"{adapter}: {nonzero_bias_refusal(to, cfg.bias_update_rate)}")
