"""Fast sanity tests for tests/tiny_models.py (runs in a few seconds on CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_models import (
    ALL_FAMILIES,
    BERT_NUM_LABELS,
    CAUSAL_FAMILIES,
    LLAVA_IMAGE_TOKEN_ID,
    LLAVA_IMAGE_TOKENS,
    PAD_TOKEN_ID,
    VOCAB,
    family_of,
    tiny_batch,
    tiny_llava_batch,
    tiny_model,
)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_family_lists():
    assert CAUSAL_FAMILIES == ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3", "phi3", "gpt2"]
    assert set(ALL_FAMILIES) == set(CAUSAL_FAMILIES) | {"bert", "llava"}


def test_unknown_family_raises():
    with pytest.raises(ValueError):
        tiny_model("not-a-family")


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_builds_and_forward_with_loss(family, padding_side):
    model = tiny_model(family)
    assert not model.training
    assert family_of(model) == family
    assert sum(p.numel() for p in model.parameters()) < 100_000
    batch = tiny_batch(model, padding_side=padding_side)
    with torch.no_grad():
        out = model(**batch)
    assert out.loss is not None and torch.isfinite(out.loss)
    b, s = batch["input_ids"].shape
    if family == "bert":
        assert out.logits.shape == (b, BERT_NUM_LABELS)
    else:
        assert out.logits.shape == (b, s, VOCAB)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_weights_reproducible(family):
    m1 = tiny_model(family, seed=0)
    m2 = tiny_model(family, seed=0)
    assert _same_weights(m1, m2)
    m3 = tiny_model(family, seed=1)
    assert not _same_weights(m1, m3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "llava"])
def test_backward_gives_finite_grads(family):
    model = tiny_model(family)
    model.train()
    out = model(**tiny_batch(model))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_train_mode_is_deterministic():
    # all dropout probabilities are 0, so train() forward == eval() forward
    model = tiny_model("gpt2")
    batch = tiny_batch(model)
    with torch.no_grad():
        ev = model(**batch).logits
        model.train()
        tr = model(**batch).logits
    torch.testing.assert_close(ev, tr)


def test_dtype_and_same_values_as_fp32():
    m32 = tiny_model("llama")
    m16 = tiny_model("llama", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    for (n, a), (_, b) in zip(m32.named_parameters(), m16.named_parameters(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), n
    with torch.no_grad():
        out = m16(**tiny_batch(m16))
    assert torch.isfinite(out.loss)


def test_global_rng_not_disturbed():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("qwen2", seed=7)
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_tiny_batch_padding(padding_side):
    batch = tiny_batch("llama", batch=3, seq=6, seed=5, padding_side=padding_side)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (3, 6)
    assert mask[:-1].all()
    assert int((mask[-1] == 0).sum()) == 2
    pad_cols = slice(0, 2) if padding_side == "left" else slice(4, 6)
    assert (mask[-1, pad_cols] == 0).all()
    assert (ids[mask == 0] == PAD_TOKEN_ID).all()
    assert (labels[mask == 0] == -100).all()
    assert torch.equal(labels[mask == 1], ids[mask == 1])
    assert (ids[mask == 1] >= 3).all() and (ids < VOCAB).all()
    # reproducible
    again = tiny_batch("llama", batch=3, seq=6, seed=5, padding_side=padding_side)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    unpadded = tiny_batch("llama", padded=False)
    assert unpadded["attention_mask"].all()


def test_bert_batch_labels():
    batch = tiny_batch("bert", batch=4)
    assert batch["labels"].shape == (4,)
    assert ((batch["labels"] >= 0) & (batch["labels"] < BERT_NUM_LABELS)).all()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_llava_batch(padding_side):
    batch = tiny_llava_batch(batch=2, seq=5, padding_side=padding_side)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "labels"}
    ids = batch["input_ids"]
    assert ids.shape == (2, 1 + LLAVA_IMAGE_TOKENS + 5)
    assert ((ids == LLAVA_IMAGE_TOKEN_ID).sum(dim=1) == LLAVA_IMAGE_TOKENS).all()
    assert (batch["labels"][ids == LLAVA_IMAGE_TOKEN_ID] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    model = tiny_model("llava")
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)
