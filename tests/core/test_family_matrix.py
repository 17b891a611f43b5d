"""The family matrix (tests/helpers/family_matrix.py): every causal-LM family transformers registers,
tiny, with `ffn` and `linear` experts; each works (fresh = base, a step trains, save/reload equal) or is
refused with a ValueError that says what to use instead. Families that cannot be built tiny are skipped with
the reason."""

from __future__ import annotations

import logging

import pytest

from tests.helpers.family_matrix import Skip, causal_lm_families, check

# families whose `ffn` experts must keep working (a regression in recognition fails here, not silently)
FFN_WORKS = {
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "gptj", "phi",
    "nemotron", "olmo2", "cohere", "granite", "stablelm", "qwen2_moe", "codegen", "persimmon", "bitnet",
    "lfm2", "starcoder2",
}  # fmt: skip
FFN_REFUSED = {"dory", "opt", "mixtral", "qwen3_moe", "olmoe"}  # lookalikes and MoE bases


@pytest.mark.parametrize("model_type", causal_lm_families())
def test_family(model_type: str) -> None:
    logging.disable(logging.WARNING)
    try:
        cells = {expert_type: check(model_type, expert_type) for expert_type in ("ffn", "linear")}
    except Skip as why:
        pytest.skip(str(why))
    finally:
        logging.disable(logging.NOTSET)
    for cell in cells.values():
        if cell.outcome == "refused":  # the message names what to do instead
            assert "expert_type='linear'" in cell.detail or "target_modules" in cell.detail, cell.detail
    assert cells["linear"].outcome == "works", cells["linear"].detail  # every family has linear layers
    if model_type in FFN_WORKS:
        assert cells["ffn"].outcome == "works", cells["ffn"].detail
    if model_type in FFN_REFUSED:
        assert cells["ffn"].outcome == "refused"
    if model_type in ("mixtral", "qwen3_moe", "olmoe"):
        assert "mixture-of-experts base" in cells["ffn"].detail
