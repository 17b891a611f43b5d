"""What moetune knows about model families: feed-forward shapes and default target modules.

An `FFNSpec` describes a feed-forward block as  post( out_proj( hidden(in_projs(x)) ) ), which lets an
`ffn` MoE layer (MixLoRA) add each expert's LoRA deltas to the projections while running the frozen
weights once. Families are recognised by structure, not by name, so fine-tunes of them work too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moetune.core import sharding
from moetune.core.kernels import activation_, glu

_SILU = nn.SiLU()  # the activation of families whose block names none (LFM2)


@dataclass(frozen=True)
class FFNSpec:
    family: str
    in_projs: tuple[str, ...]  # applied to x; their outputs feed `hidden`
    out_proj: str
    act_attr: str | None  # the activation module's name; None: SiLU written inline in the forward (LFM2)
    # (act, in-proj outputs, in_place) -> h; in_place: the outputs are fresh and read by nothing else,
    # so they may be overwritten (in the forward without autograd, in SiluGLU's backward with it)
    hidden: Callable[..., Tensor]
    formula: str  # what the block must compute, for messages
    # a dropout on the FFN output: a module's name (GPT-2), or a float attribute's, the probability
    # the forward passes to functional dropout (Starcoder2)
    post_dropout: str | None = None
    mid_norm: str | None = None  # a norm on the hidden state before out_proj (BitNet's ffn_sub_norm)

    @property
    def projections(self) -> tuple[str, ...]:
        return (*self.in_projs, self.out_proj)

    def matches(self, module: nn.Module) -> bool:
        named = [a for a in (self.act_attr, self.mid_norm, self.post_dropout) if a]
        projections = all(is_linear_like(getattr(module, p, None)) for p in self.projections)
        return projections and all(hasattr(module, a) for a in named)

    def activation(self, module: nn.Module) -> Callable[[Tensor], Tensor]:
        return _SILU if self.act_attr is None else getattr(module, self.act_attr)

    def hidden_state(self, module: nn.Module, outs: list[Tensor], in_place: bool = False) -> Tensor:
        """The hidden state out_proj reads, from the in-projections' outputs: the activation (gated or
        not), then the mid norm if the block has one."""
        h = self.hidden(self.activation(module), outs, in_place)
        return getattr(module, self.mid_norm)(h) if self.mid_norm else h

    def output(self, module: nn.Module, y: Tensor) -> Tensor:
        """The block's output from out_proj's: its post dropout, if it has one."""
        if not self.post_dropout:
            return y
        dropout = getattr(module, self.post_dropout)
        if isinstance(dropout, float | int):
            return nn.functional.dropout(y, p=float(dropout), training=module.training)
        return dropout(y)


def _gated(act: Callable[[Tensor], Tensor], outs: list[Tensor], in_place: bool = False) -> Tensor:
    return glu(act, *outs, in_place)


def _gated_fused(act: Callable[[Tensor], Tensor], outs: list[Tensor], in_place: bool = False) -> Tensor:
    return glu(act, *outs[0].chunk(2, dim=-1), in_place)


def _plain(act: Callable[[Tensor], Tensor], outs: list[Tensor], in_place: bool = False) -> Tensor:
    return activation_(act, outs[0]) if in_place and not torch.is_grad_enabled() else act(outs[0])


FFN_SPECS = (
    # BitNet: down(sub_norm(act(gate(x)) * up(x))), before the plain gated shape it also has
    FFNSpec(
        "gated_subnorm",
        ("gate_proj", "up_proj"),
        "down_proj",
        "act_fn",
        _gated,
        "down(ffn_sub_norm(act(gate(x)) * up(x)))",
        mid_norm="ffn_sub_norm",
    ),
    # Llama, Mistral, Qwen2/3, Gemma/Gemma2/Gemma3, and most decoder LLMs: down(act(gate(x)) * up(x))
    FFNSpec("gated", ("gate_proj", "up_proj"), "down_proj", "act_fn", _gated, "down(act(gate(x)) * up(x))"),
    # Phi-3: gate and up fused in one projection
    FFNSpec(
        "gated_fused",
        ("gate_up_proj",),
        "down_proj",
        "activation_fn",
        _gated_fused,
        "down(act(g) * u) with (g, u) = gate_up(x)",
    ),
    # GPT-2: dropout(c_proj(act(c_fc(x)))) with Conv1D projections
    FFNSpec(
        "gpt2", ("c_fc",), "c_proj", "act", _plain, "dropout(c_proj(act(c_fc(x))))", post_dropout="dropout"
    ),
    # LFM2: w2(silu(w1(x)) * w3(x)), the SiLU written in the forward
    FFNSpec("lfm2", ("w1", "w3"), "w2", None, _gated, "w2(silu(w1(x)) * w3(x))"),
    # Starcoder2: GPT-2's projections, a functional dropout of probability `residual_dropout`
    FFNSpec(
        "starcoder2",
        ("c_fc",),
        "c_proj",
        "act",
        _plain,
        "dropout(c_proj(act(c_fc(x))), p=residual_dropout)",
        post_dropout="residual_dropout",
    ),
    # non-gated blocks, after the gated ones (a gated block has up_proj/down_proj too):
    # Nemotron, Arcee, Apertus
    FFNSpec("up_down", ("up_proj",), "down_proj", "act_fn", _plain, "down(act(up(x)))"),
    # Phi-1/2
    FFNSpec("fc", ("fc1",), "fc2", "activation_fn", _plain, "fc2(act(fc1(x)))"),
    # GPT-J, CodeGen
    FFNSpec(
        "fc_in_out",
        ("fc_in",),
        "fc_out",
        "act",
        _plain,
        "dropout(fc_out(act(fc_in(x))))",
        post_dropout="dropout",
    ),
    # GPT-NeoX / Pythia, Persimmon
    FFNSpec(
        "neox", ("dense_h_to_4h",), "dense_4h_to_h", "act", _plain, "dense_4h_to_h(act(dense_h_to_4h(x)))"
    ),
)

# Encoders whose FFN is split across modules: `linear` experts on both halves (a full-match regex).
SPLIT_FFN_TARGETS = {
    "bert": r".*layer\.\d+\.(intermediate|output)\.dense",
    "roberta": r".*layer\.\d+\.(intermediate|output)\.dense",
    "xlm-roberta": r".*layer\.\d+\.(intermediate|output)\.dense",
    "electra": r".*layer\.\d+\.(intermediate|output)\.dense",
}

ATTENTION_SUFFIXES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",  # Llama family, Phi-3
    "attn.c_attn",
    "attn.c_proj",  # GPT-2
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",  # BERT
)

# Default targets stay in the language model of a multimodal model (the vision tower and
# projector are untouched unless the user names them).
NON_LANGUAGE_SCOPES = re.compile(
    r"(^|\.)(vision_tower|vision_model|visual|multi_modal_projector|audio_tower)(\.|$)"
)


def is_linear_like(module: object) -> bool:
    """nn.Linear (and subclasses: quantized linears) or transformers' Conv1D (GPT-2)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = sharding.full_shape(module.weight)  # Conv1D stores (in, out)
    return d_in, d_out


def is_quantized(weight: Tensor) -> bool:
    """A weight stored quantized: an integer dtype (bitsandbytes' Params4bit, Int8Params) or a tensor
    subclass over inner tensors (torchao's Int8Tensor, AffineQuantizedTensor, whose dtype is the float
    dtype they compute in), other than an FSDP2 shard (a DTensor, which has `full_tensor`)."""
    if not weight.dtype.is_floating_point:
        return True
    subclass = type(weight) not in (Tensor, nn.Parameter) and hasattr(weight, "__tensor_flatten__")
    return subclass and not hasattr(weight, "full_tensor")


def find_ffn_spec(module: nn.Module) -> FFNSpec | None:
    return next((spec for spec in FFN_SPECS if spec.matches(module)), None)


def decomposition_error(module: nn.Module, spec: FFNSpec) -> str | None:
    """Why `module`, which has the projections of `spec`, is not `spec.formula`; None when it is.

    Recognition is structural, so a block can look like a known one and compute something else (BitNet
    normalises the hidden state before its down projection; Starcoder2's block has GPT-2's projections
    but no `dropout`). Both ways are run on a small random input, in eval mode and without autograd: the
    block's own forward, and the decomposition moetune computes with no expert. They must agree within
    the dtype's rounding. Blocks whose weights are not all here (meta device, ZeRO-3 or FSDP2 shards)
    are not checked, nor blocks with quantized weights: running a bitsandbytes layer may change its
    quantization state (its fresh model then no longer gives the base's outputs).
    """
    params = list(module.parameters())
    if any(p.is_meta or sharding.is_zero3(p) or sharding.is_dtensor(p) or is_quantized(p) for p in params):
        return None  # not here to run, or (a quantized layer) its state may change when it runs
    floats = [p for p in (*params, *module.buffers()) if p.is_floating_point()]
    dtype = next((p.dtype for p in floats if not is_quantized(p)), torch.float32)
    device = params[0].device if params else torch.device("cpu")
    d_in = linear_dims(getattr(module, spec.in_projs[0]))[0]
    x = torch.randn(1, 3, d_in, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            try:
                outs = [getattr(module, p)(x) for p in spec.in_projs]
                y = spec.output(module, getattr(module, spec.out_proj)(spec.hidden_state(module, outs)))
            except Exception as err:  # noqa: BLE001 - any failure means the decomposition does not apply
                return f"the decomposition fails on it ({type(err).__name__}: {err})"
            try:
                reference = module(x)
            except Exception as err:  # noqa: BLE001 - e.g. a forward that also takes the residual (MPT)
                return f"its forward does not take the hidden states alone ({type(err).__name__}: {err})"
    finally:
        for m, training in modes.items():
            m.train(training)
    if not isinstance(reference, Tensor) or reference.shape != y.shape:
        return f"its forward returns {type(reference).__name__}, not one tensor of shape {tuple(y.shape)}"
    error = (y.double() - reference.double()).abs().max().item()
    scale = reference.double().abs().max().item()
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    if not error <= tolerance * max(scale, 1e-6):  # also catches NaN
        return f"its output differs from the decomposition's by {error:.3g} (max |output| {scale:.3g})"
    return None


def in_language_model(name: str) -> bool:
    return NON_LANGUAGE_SCOPES.search(name) is None


_LAYER_INDEX = re.compile(r"\.(\d+)(\.|$)")


def layer_index(name: str) -> int:
    """Transformer layer of a module path: the first numeric component (`model.layers.3.mlp` -> 3)."""
    m = _LAYER_INDEX.search("." + name)
    if m is None:
        raise ValueError(f"cannot tell which transformer layer module {name!r} is in (no numeric component)")
    return int(m.group(1))


def name_matches(name: str, targets: list[str] | str) -> bool:
    """peft's rule: a string is a full-match regex; a list matches names or dotted suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)
