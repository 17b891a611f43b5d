"""Tiny, randomly initialised transformers models for fast offline tests.

Every model is built from a config (no download), with
hidden 32, intermediate 64, 2 layers, 4 heads, 2 KV heads (where the family
supports GQA), vocab 128, max positions 128, head_dim 8.

* ``tiny_model(family, seed=0, dtype=torch.float32)`` -> model in eval mode,
  eager attention, all dropout probabilities set to 0 (so ``.train()`` stays
  deterministic). Weights are a pure function of ``seed``: the model is built
  in float32 under ``torch.manual_seed(seed)`` and then cast to ``dtype``.
  The global RNG state is restored afterwards so callers are not disturbed.
* ``tiny_batch(model_or_family, batch=2, seq=7, seed=0, padded=True,
  padding_side="right")`` -> dict with ``input_ids``, ``attention_mask`` and
  ``labels``. When ``padded`` is true, the LAST row is padded (RIGHT padding
  by default; pass ``padding_side="left"`` for left padding) with
  ``PAD_TOKEN_ID`` (0) for 2 positions; labels are ``-100`` on padding.
  For "bert" (BertForSequenceClassification, num_labels=3) ``labels`` is a
  LongTensor of shape ``(batch,)`` with values in ``[0, 3)``.
  For "llava" use ``tiny_llava_batch`` (``tiny_batch`` forwards to it): it
  adds ``pixel_values`` and ``LLAVA_IMAGE_TOKENS`` image tokens per row
  (labels are also -100 on the image tokens).
"""

from __future__ import annotations

import contextlib

import torch

PAD_TOKEN_ID = 0
VOCAB = 128
HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 8
MAX_POS = 128
BERT_NUM_LABELS = 3

# llava specifics: 16x16 image, 8x8 patches -> 4 patches (+CLS, which the
# "default" feature-select strategy drops) -> 4 image tokens per image.
LLAVA_IMAGE_TOKEN_ID = VOCAB - 1  # 127
LLAVA_IMAGE_SIZE = 16
LLAVA_PATCH_SIZE = 8
LLAVA_IMAGE_TOKENS = (LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2  # 4

CAUSAL_FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3", "phi3", "gpt2"]
ALL_FAMILIES = CAUSAL_FAMILIES + ["bert", "llava"]

# config.model_type -> family name (for tiny_batch(model))
_MODEL_TYPE_TO_FAMILY = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "bert": "bert",
    "llava": "llava",
}

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    max_position_embeddings=MAX_POS,
    pad_token_id=PAD_TOKEN_ID,
    bos_token_id=1,
    eos_token_id=2,
)


def _llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(_COMMON, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def _build(family: str):
    """Return an (uninitialised-RNG) freshly constructed float32 model for ``family``."""
    import transformers as T

    if family == "llama":
        return T.LlamaForCausalLM(_llama_config())
    if family == "mistral":
        cfg = T.MistralConfig(**_COMMON, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, sliding_window=None)
        return T.MistralForCausalLM(cfg)
    if family == "qwen2":
        cfg = T.Qwen2Config(**_COMMON, num_key_value_heads=KV_HEADS, use_sliding_window=False)
        return T.Qwen2ForCausalLM(cfg)
    if family == "gemma":
        cfg = T.GemmaConfig(**_COMMON, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)
        return T.GemmaForCausalLM(cfg)
    if family == "gemma2":
        cfg = T.Gemma2Config(
            **_COMMON,
            num_key_value_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=4,
        )
        return T.Gemma2ForCausalLM(cfg)
    if family == "gemma3":
        cfg = T.Gemma3TextConfig(
            **_COMMON,
            num_key_value_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        )
        return T.Gemma3ForCausalLM(cfg)
    if family == "phi3":
        cfg = T.Phi3Config(
            **_COMMON,
            num_key_value_heads=KV_HEADS,
            original_max_position_embeddings=MAX_POS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
        )
        return T.Phi3ForCausalLM(cfg)
    if family == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=VOCAB,
            n_positions=MAX_POS,
            n_embd=HIDDEN,
            n_inner=INTERMEDIATE,
            n_layer=LAYERS,
            n_head=HEADS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            pad_token_id=PAD_TOKEN_ID,
            bos_token_id=1,
            eos_token_id=2,
        )
        return T.GPT2LMHeadModel(cfg)
    if family == "bert":
        cfg = T.BertConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POS,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=PAD_TOKEN_ID,
            num_labels=BERT_NUM_LABELS,
        )
        return T.BertForSequenceClassification(cfg)
    if family == "llava":
        vision = T.CLIPVisionConfig(
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            projection_dim=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_channels=3,
            image_size=LLAVA_IMAGE_SIZE,
            patch_size=LLAVA_PATCH_SIZE,
        )
        text = _llama_config()
        cfg = T.LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=LLAVA_IMAGE_TOKEN_ID,
            image_seq_length=LLAVA_IMAGE_TOKENS,
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )
        return T.LlavaForConditionalGeneration(cfg)
    raise ValueError(f"unknown tiny model family {family!r}; expected one of {ALL_FAMILIES}")


@contextlib.contextmanager
def _forked_rng(seed: int):
    state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        yield
    finally:
        torch.set_rng_state(state)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Tiny random model of ``family`` (see module docstring), eval mode, eager attention."""
    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {ALL_FAMILIES}")
    with _forked_rng(seed):
        model = _build(family)
    model.set_attn_implementation("eager")
    model = model.to(dtype)
    model.eval()
    return model


def family_of(model_or_family) -> str:
    if isinstance(model_or_family, str):
        if model_or_family not in ALL_FAMILIES:
            raise ValueError(f"unknown tiny model family {model_or_family!r}")
        return model_or_family
    model_type = model_or_family.config.model_type
    try:
        return _MODEL_TYPE_TO_FAMILY[model_type]
    except KeyError:
        raise ValueError(f"no tiny family for model_type {model_type!r}") from None


def _pad_last_row(input_ids, attention_mask, n_pad: int, padding_side: str):
    seq = input_ids.shape[1]
    if padding_side == "right":
        sl = slice(seq - n_pad, seq)
    elif padding_side == "left":
        sl = slice(0, n_pad)
    else:
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    input_ids[-1, sl] = PAD_TOKEN_ID
    attention_mask[-1, sl] = 0


def tiny_batch(
    model_or_family,
    batch: int = 2,
    seq: int = 7,
    seed: int = 0,
    padded: bool = True,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Small batch for ``model_or_family``.

    Tokens are drawn from ``[3, VOCAB - 1)`` (never pad/bos/eos/image token).
    If ``padded``, the last row gets 2 pad positions on ``padding_side``
    (default right) with attention_mask 0 and labels -100.
    """
    family = family_of(model_or_family)
    if family == "llava":
        return tiny_llava_batch(batch=batch, seq=seq, seed=seed, padded=padded, padding_side=padding_side)
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB - 1, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        _pad_last_row(input_ids, attention_mask, min(2, seq - 1), padding_side)
    if family == "bert":
        labels = torch.randint(0, BERT_NUM_LABELS, (batch,), generator=g)
    else:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tiny_llava_batch(
    batch: int = 2,
    seq: int = 7,
    seed: int = 0,
    padded: bool = True,
    padding_side: str = "right",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Batch for ``tiny_model("llava")``: one image per row.

    Each row is ``[bos] + [IMG]*LLAVA_IMAGE_TOKENS + text`` (text length ``seq``),
    so the total length is ``1 + LLAVA_IMAGE_TOKENS + seq``. ``pixel_values``
    has shape ``(batch, 3, 16, 16)`` and ``dtype``. Labels are -100 on the
    bos, image and pad positions. Padding (if any) is on the last row's text
    part (right) or before bos (left).
    """
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, VOCAB - 1, (batch, seq), generator=g)
    bos = torch.full((batch, 1), 1, dtype=torch.long)
    img = torch.full((batch, LLAVA_IMAGE_TOKENS), LLAVA_IMAGE_TOKEN_ID, dtype=torch.long)
    input_ids = torch.cat([bos, img, text], dim=1)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, : 1 + LLAVA_IMAGE_TOKENS] = -100
    if padded:
        n_pad = min(2, seq - 1)
        if padding_side == "right":
            _pad_last_row(input_ids, attention_mask, n_pad, "right")
        elif padding_side == "left":
            # shift the last row right and pad on the left, keeping all image tokens
            row = input_ids[-1, : input_ids.shape[1] - n_pad].clone()
            lrow = labels[-1, : input_ids.shape[1] - n_pad].clone()
            input_ids[-1] = torch.cat([torch.full((n_pad,), PAD_TOKEN_ID, dtype=torch.long), row])
            labels[-1] = torch.cat([torch.full((n_pad,), -100, dtype=torch.long), lrow])
            attention_mask[-1, :n_pad] = 0
        else:
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        labels = labels.masked_fill(attention_mask == 0, -100)
    pixel_values = torch.randn(batch, 3, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, generator=g).to(dtype)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "labels": labels,
    }


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_chat_tokenizer(extra_words: tuple[str, ...] = ()):
    """A word-level tokenizer with a ChatML template (ids < 128, so it fits the tiny models' vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "<pad>",
        "<|im_start|>",
        "<|im_end|>",
        "[UNK]",
        "user",
        "assistant",
        "hi",
        "there",
        "what",
        "is",
        "?",
        "+",
        "=",
        "positive",
        "negative",
        "Review:",
        "good",
        "bad",
        "film",
        *extra_words,
        *[str(i) for i in range(100)],
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # newlines vanish; the markers are special tokens
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    assert len(fast) <= 128
    return fast
