"""Every causal-LM family transformers registers, built tiny from its config, with `ffn` and `linear`
experts: each either works or is refused with a ValueError; never another exception, never a wrong model.

`check(model_type, expert_type)` is one cell of the matrix; `python tests/helpers/family_matrix.py [OUT.md]`
writes the whole table (family, `ffn`, `linear`, what is adapted).
"""

from __future__ import annotations

import functools
import logging
import sys
import tempfile
import warnings
from dataclasses import dataclass

import torch

SHRINK = dict(  # every size a config may name, small; ids inside the vocabulary
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    head_dim=8,
    max_position_embeddings=64,
    n_embd=32,
    n_layer=2,
    n_head=4,
    d_model=32,
    ffn_dim=64,
    n_inner=64,
    num_layers=2,
    moe_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    shared_expert_intermediate_size=32,
    rotary_dim=4,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    decoder_start_token_id=0,
)
MAX_PARAMETERS = 3_000_000  # a config the sizes above do not shrink (other names) is skipped


class Skip(Exception):
    """The family cannot be built tiny here; the message says why."""


@dataclass
class Cell:
    outcome: str  # "works" or "refused"
    detail: str  # what is adapted, or the refusal's message


def causal_lm_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@functools.cache
def tiny_config(model_type: str):
    """The family's default config with its sizes shrunk (checked once: it builds, runs, is small)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(model_type)
        for key, value in SHRINK.items():
            if hasattr(config, key):
                setattr(config, key, value)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list):
            config.layer_types = layer_types[:2]
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if size > MAX_PARAMETERS:
            raise Skip(f"its config keeps {size:,} parameters with the usual size fields shrunk")
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            model(input_ids=ids())
    except Skip:
        raise
    except Exception as err:  # noqa: BLE001 - transformers' own failure to build or run the tiny model
        first_line = str(err).splitlines()[0][:120] if str(err) else ""
        raise Skip(f"tiny build fails in transformers: {type(err).__name__}: {first_line}") from None
    return config


def tiny_model(model_type: str) -> torch.nn.Module:
    """A random tiny model of the family (seed 0) in eval mode, or Skip with the reason."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids())
    return out.logits.float()


def check(model_type: str, expert_type: str) -> Cell:
    """Inject experts of `expert_type`; if it works: fresh = base logits (1e-5 relative), one training
    step moves them, save and reload give them back. A refusal must be a ValueError. AssertionError
    or any other exception is a failure of the matrix."""
    import moetune

    model = tiny_model(model_type)
    base = logits(model)
    cfg = moetune.MoEConfig(expert_type=expert_type, num_experts=4, top_k=2, r=4, lora_dropout=0.0)
    try:
        moe = moetune.get_moe_model(model, cfg)
    except ValueError as err:
        return Cell("refused", str(err))
    moe.eval()
    fresh = logits(moe)
    scale = base.abs().max().clamp_min(1e-6)
    assert ((fresh - base).abs().max() / scale).item() <= 1e-5, f"{model_type}/{expert_type}: fresh != base"
    moe.train()
    params = [p for p in moe.parameters() if p.requires_grad]
    moe(input_ids=ids(), labels=ids()).loss.backward()
    with torch.no_grad():
        for p in params:
            p -= 1.0 * p.grad.sign()  # one large step: B moves off zero
    moe.eval()
    trained = logits(moe)
    assert ((trained - base).abs().max() / scale).item() > 1e-4, (
        f"{model_type}/{expert_type}: nothing trained"
    )
    with tempfile.TemporaryDirectory() as tmp:
        moe.save_pretrained(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the base fingerprint of a fresh random model: a warning
            reloaded = moetune.MoEModel.from_pretrained(tiny_model(model_type), tmp).eval()
    torch.testing.assert_close(logits(reloaded), trained, rtol=1e-5, atol=1e-5)
    adapted: dict[str, list[str]] = {}  # module name -> projections with experts (ffn)
    for name, layer in moe.moe_layers():
        experts = layer.experts
        adapted[name.rsplit(".", 1)[-1]] = sorted(experts) if isinstance(experts, torch.nn.ModuleDict) else []
    return Cell("works", ", ".join(f"{m} ({'/'.join(p)})" if p else m for m, p in sorted(adapted.items())))


PAGE = """# Model families

Every causal-LM family registered in transformers {version}, built tiny from its default config (sizes
shrunk, random weights), with `expert_type="ffn"` and `expert_type="linear"` at their defaults
(`tests/helpers/family_matrix.py`; `python tests/helpers/family_matrix.py docs/families.md` rewrites this
page, and `tests/core/test_family_matrix.py` runs the same checks in the test suite). **yes** means: a
fresh model gives the base model's logits (within 1e-5 relative), one training step changes them, and
save/reload gives them back; the projections listed are the ones that carry experts. **refused** is a
`ValueError` before anything changes, whose message says what to use instead. A family that cannot be
built tiny here (its config keeps large sizes under other names, or transformers fails on the shrunk
config) is listed with the reason.

`ffn` experts (MixLoRA) need a feed-forward block computing one of `down(act(gate(x)) * up(x))`,
`down(act(g) * u)` with `(g, u) = gate_up(x)`, BitNet's `down(ffn_sub_norm(act(gate(x)) * up(x)))`,
LFM2's `w2(silu(w1(x)) * w3(x))`, GPT-2's `dropout(c_proj(act(c_fc(x))))` (Starcoder2's with a
functional dropout), or the non-gated `down(act(up(x)))`, `fc2(act(fc1(x)))`,
`dropout(fc_out(act(fc_in(x))))`, `dense_4h_to_h(act(dense_h_to_4h(x)))`. Each block is checked at
injection: it is run both ways on a small input (its own forward and moetune's decomposition), and a
block that computes something else (Dory's block, which has BitNet's names; a decoder layer holding
`fc1`/`fc2` beside its attention, as OPT's) is refused. On
mixture-of-experts bases `ffn` experts attach to the shared experts where the family has them
(Qwen2-MoE, ERNIE-4.5-MoE, GLM-4-MoE...); the routed experts are refused, and `linear` experts and
`attn_r` work on the attention and other linear layers. Without `target_modules`, `linear` experts take
the FFN projections of the shapes above, and in other families every linear layer of the decoder
blocks (peft's `all-linear`, never the output head; MoE routers excluded).

"""


def table() -> str:
    logging.disable(logging.WARNING)
    rows = ["| family | `ffn` | `linear` |", "|---|---|---|"]
    for model_type in causal_lm_families():
        cells = []
        for expert_type in ("ffn", "linear"):
            try:
                cell = check(model_type, expert_type)
            except Skip as why:
                cells = [f"not built tiny: {why}"] * 2
                break
            if cell.outcome == "works":
                cells.append(f"yes: {cell.detail}")
            else:
                cells.append(f"refused: {cell.detail.split(';')[0].split(':')[0][:90]}")
        rows.append(f"| {model_type} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    import transformers

    text = PAGE.format(version=transformers.__version__) + table()
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        print(text, end="")
    print(f"{text.count('yes:')} working cells", file=sys.stderr)
