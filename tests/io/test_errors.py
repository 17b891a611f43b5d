"""Bad input raises an error whose message names the field or module, the value, and what is allowed."""

from __future__ import annotations

import copy
import json
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

import moetune
from moetune.config import CONFIG_NAME
from moetune.core.layers import LoRALinear, MoEFFN, MoELinear, TrainableCopy
from moetune.io.adapter import WEIGHTS_NAME, AdapterError, adapter_state_dict, load_adapter_weights
from tests.helpers.tiny_models import tiny_model

MOETUNE_MODULES = (MoEFFN, MoELinear, LoRALinear, TrainableCopy)


def message_of(excinfo) -> str:
    return str(excinfo.value)


# ------------------------------------------------------------------------ config fields


def test_top_k_larger_than_num_experts():
    with pytest.raises(ValueError) as err:
        moetune.MoEConfig(num_experts=2, top_k=3)
    msg = message_of(err)
    assert "top_k=3" in msg and "num_experts=2" in msg and "1..2" in msg
    with pytest.raises(ValueError, match=r"top_k=3.*num_experts=\[4, 2\]"):
        moetune.MoEConfig(num_experts=[4, 2], top_k=3)  # the smallest layer decides


def test_unknown_router_lists_the_routers():
    with pytest.raises(ValueError) as err:
        moetune.MoEConfig(router="bogus")
    msg = message_of(err)
    assert "router" in msg and "bogus" in msg
    assert all(name in msg for name in ("topk", "topp", "soft", "switch", "threshold"))


def test_unknown_expert_type_lists_the_types():
    with pytest.raises(ValueError) as err:
        moetune.MoEConfig(expert_type="moe")
    msg = message_of(err)
    assert "expert_type" in msg and "moe" in msg and "ffn" in msg and "linear" in msg


@pytest.mark.parametrize("r", [0, -1])
def test_rank_must_be_positive(r):
    with pytest.raises(ValueError) as err:
        moetune.MoEConfig(r=r)
    msg = message_of(err)
    assert f"r={r}" in msg and ">= 1" in msg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_experts", 0),
        ("num_experts", [2, 0]),
        ("top_k", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("capacity_factor", 0.0),
        ("threshold_max", 1.5),
        ("lora_dropout", 1.0),
        ("attn_r", -1),
        ("num_shared_experts", -1),
        ("router_dtype", "int8"),
        ("router_jitter", 1.0),
        ("aux_loss_coef", -0.1),
        ("z_loss_coef", -1.0),
        ("importance_loss_coef", -1.0),
        ("contrastive_loss_coef", -1.0),
        ("contrastive_mode", "cosine"),
        ("contrastive_temperature", 0.0),
        ("contrastive_sample", 0),
        ("bias_update_rate", -0.5),
        ("task_routing", "per-token"),
    ],
)
def test_bad_field_value_names_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        moetune.MoEConfig(**{field: value})
    msg = message_of(err)
    assert f"{field}=" in msg and str(value) in msg, msg


# ------------------------------------------------------------------------ targets in a model


def test_target_modules_matching_nothing_lists_existing_modules():
    for target, shown in ((["nonexistent"], "nonexistent"), (r"nothing\..*", "nothing")):
        cfg = moetune.MoEConfig(expert_type="linear", target_modules=target)
        with pytest.raises(ValueError) as err:
            moetune.get_moe_model(tiny_model("llama"), cfg)
        msg = message_of(err)
        assert "target_modules" in msg and shown in msg
        assert "up_proj" in msg and "q_proj" in msg


def test_module_targeted_twice():
    cfg = moetune.MoEConfig(expert_type="linear", target_modules=["q_proj"], attn_r=4)
    with pytest.raises(ValueError) as err:
        moetune.get_moe_model(tiny_model("llama"), cfg)
    msg = message_of(err)
    assert "q_proj" in msg and "twice" in msg and "attn" in msg


@pytest.mark.parametrize("targets", [["q_proj"], ["up_proj", "o_proj"], ["c_fc"]])
def test_ffn_targets_must_be_ffn_projections(targets):
    with pytest.raises(ValueError) as err:
        moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(target_modules=targets))
    msg = message_of(err)
    assert "target_modules" in msg and "ffn" in msg
    assert all(p in msg for p in ("gate_proj", "up_proj", "down_proj"))


def test_ffn_on_bert_explains_linear():
    with pytest.raises(ValueError) as err:
        moetune.get_moe_model(tiny_model("bert"), moetune.MoEConfig())
    msg = message_of(err)
    assert "expert_type='linear'" in msg and "intermediate.dense" in msg


def test_attn_targets_matching_nothing():
    with pytest.raises(ValueError, match=r"attn_target_modules=\['zzz'\].*q_proj"):
        moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(attn_r=2, attn_target_modules=["zzz"]))


def test_modules_to_save_matching_nothing():
    with pytest.raises(ValueError, match=r"modules_to_save.*'nohead'.*lm_head"):
        moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(modules_to_save=["nohead"]))


@pytest.mark.parametrize(
    ("cfg_kw", "module"),
    [
        (dict(modules_to_save=["layers.1"]), "layers.1"),  # a block holding an MoE layer
        (dict(modules_to_save=["mlp"]), "mlp"),  # the MoE layer itself
        (dict(expert_type="linear", modules_to_save=["up_proj"]), "up_proj"),
        (dict(attn_r=2, modules_to_save=["q_proj"]), "q_proj"),  # the attention LoRA
    ],
)
def test_modules_to_save_overlapping_an_adapted_module(cfg_kw, module):
    """A module may carry one adapter: a trained copy of (a block holding) experts or LoRA is an error.

    Accepted silently, the copy holds deep-copied MoE layers with their own stale routing context: they
    count padding, their losses are left out of out.loss, and their trained base weights are not saved.
    """
    with pytest.raises(ValueError) as err:
        moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(num_experts=4, **cfg_kw))
    msg = message_of(err)
    assert "modules_to_save" in msg and module in msg


@pytest.mark.parametrize("expert_type", ["ffn", "linear"])
def test_num_experts_list_of_wrong_length(expert_type):
    with pytest.raises(ValueError) as err:
        moetune.get_moe_model(
            tiny_model("llama"), moetune.MoEConfig(expert_type=expert_type, num_experts=[2, 4, 8], top_k=2)
        )
    msg = message_of(err)
    assert "num_experts" in msg and "3" in msg and "2 layers" in msg


@pytest.mark.parametrize(
    "cfg_kw",
    [
        dict(num_experts=[2, 4, 8], top_k=2, attn_r=4),  # found while injecting, after the attention LoRA
        dict(num_experts=[2, 4, 8], top_k=2, expert_type="linear", modules_to_save=["lm_head"]),
        dict(num_experts=[2, 4, 8], top_k=2),
    ],
)
def test_failed_injection_leaves_the_model_untouched(cfg_kw):
    """An invalid config must not leave a half-injected model (and a retry must work)."""
    model = tiny_model("llama")
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match="num_experts"):
        moetune.get_moe_model(model, moetune.MoEConfig(**cfg_kw))
    assert not [n for n, m in model.named_modules() if isinstance(m, MOETUNE_MODULES)]
    assert [n for n, _ in model.named_modules()] == names
    assert all(p.requires_grad for p in model.parameters())
    fixed = dict(cfg_kw, num_experts=[2, 4])
    moe = moetune.get_moe_model(model, moetune.MoEConfig(**fixed))
    assert len(list(moe.moe_layers())) > 0


# ------------------------------------------------------------------------ loading an adapter


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(num_experts=4, r=4)).save_pretrained(path)
    return path


def other_llama(**changes) -> LlamaForCausalLM:
    config = copy.deepcopy(tiny_model("llama").config)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_load_onto_other_intermediate_size_names_tensor_and_shapes(llama_adapter):
    with pytest.raises(ValueError) as err:
        moetune.MoEModel.from_pretrained(other_llama(intermediate_size=48), llama_adapter)
    msg = message_of(err)
    # what the other base would need, tensor by tensor
    needed = adapter_state_dict(
        moetune.get_moe_model(other_llama(intermediate_size=48), moetune.MoEConfig(num_experts=4, r=4))
    )
    saved = adapter_state_dict(
        moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(num_experts=4, r=4))
    )
    differing = [k for k in saved if saved[k].shape != needed[k].shape]
    assert differing
    named = [k for k in differing if k in msg]
    assert named, msg
    key = named[0]
    assert str(tuple(saved[key].shape)) in msg and str(tuple(needed[key].shape)) in msg, msg
    assert str(llama_adapter) in msg


@pytest.mark.parametrize(("layers", "word"), [(3, "missing"), (1, "unexpected")])
def test_load_onto_other_layer_count_names_tensors(llama_adapter, layers, word):
    with pytest.raises(ValueError) as err:
        moetune.MoEModel.from_pretrained(other_llama(num_hidden_layers=layers), llama_adapter)
    msg = message_of(err)
    assert word in msg
    index = 2 if layers == 3 else 1  # the layer the adapter lacks / the base lacks
    assert re.search(rf"model\.layers\.{index}\.mlp\.\S+", msg), msg


def test_load_onto_other_architecture(llama_adapter):
    with pytest.raises(ValueError) as err:
        moetune.MoEModel.from_pretrained(tiny_model("gpt2"), llama_adapter)
    msg = message_of(err)
    assert "missing" in msg and "unexpected" in msg and "transformer.h.0" in msg and "model.layers.0" in msg


def test_load_from_missing_path(tmp_path):
    missing = tmp_path / "no_such_adapter"
    with pytest.raises(FileNotFoundError) as err:
        moetune.MoEModel.from_pretrained(tiny_model("llama"), missing)
    assert str(missing) in message_of(err)


def test_load_from_directory_without_weights(tmp_path, llama_adapter):
    (tmp_path / "moetune_config.json").write_text((llama_adapter / "moetune_config.json").read_text())
    with pytest.raises(FileNotFoundError) as err:
        moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert str(tmp_path) in message_of(err) and WEIGHTS_NAME in message_of(err)


def test_load_corrupt_weights_names_the_file(tmp_path, llama_adapter):
    (tmp_path / "moetune_config.json").write_text((llama_adapter / "moetune_config.json").read_text())
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError) as err:
        moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert WEIGHTS_NAME in message_of(err)


def test_failed_load_leaves_the_base_untouched(llama_adapter):
    base = other_llama(intermediate_size=48)
    before = {n: (p.requires_grad, p.clone()) for n, p in base.named_parameters()}
    modules_before = [type(m) for m in base.modules()]
    with pytest.raises(ValueError):
        moetune.MoEModel.from_pretrained(base, llama_adapter)
    assert [type(m) for m in base.modules()] == modules_before
    after = dict(base.named_parameters())
    assert after.keys() == before.keys()
    for name, (grad, value) in before.items():
        assert after[name].requires_grad == grad and torch.equal(after[name], value), name
    moetune.get_moe_model(base, moetune.MoEConfig(num_experts=4, r=4))  # and it can be injected again


# ------------------------------------------------------------------------ damaged or tampered adapter files


@pytest.fixture
def adapter_copy(tmp_path, llama_adapter):
    """A private copy of the llama adapter, to damage."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (tmp_path / name).write_bytes((llama_adapter / name).read_bytes())
    return tmp_path


def load_error(path, error=ValueError, base=None) -> str:
    with pytest.raises(error) as err:
        moetune.MoEModel.from_pretrained(base or tiny_model("llama"), path)
    return message_of(err)


def data_start(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]  # safetensors: u64 header length, JSON header, data


def resave(path, **metadata_changes) -> None:
    """Rewrite the weights with edited metadata (None removes a key); tensors and checksums kept."""
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    for key, value in metadata_changes.items():
        metadata.pop(key) if value is None else metadata.__setitem__(key, value)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata=metadata)


def test_flipped_byte_in_the_data_fails_the_checksum(adapter_copy):
    raw = bytearray((adapter_copy / WEIGHTS_NAME).read_bytes())
    raw[data_start(raw) + 3] ^= 0x01
    (adapter_copy / WEIGHTS_NAME).write_bytes(bytes(raw))
    msg = load_error(adapter_copy, AdapterError)
    assert str(adapter_copy / WEIGHTS_NAME) in msg and "checksum" in msg
    assert re.search(r"tensor model\.layers\.\d\.mlp\.\S+ fails", msg), msg


@pytest.mark.parametrize("keep", ["1 byte less", "half the data", "half the header", "nothing"])
def test_truncated_weights_name_the_file(adapter_copy, keep):
    raw = (adapter_copy / WEIGHTS_NAME).read_bytes()
    start = data_start(raw)
    cut = {"1 byte less": len(raw) - 1, "half the data": (start + len(raw)) // 2}.get(keep)
    cut = cut if cut is not None else (start // 2 if keep == "half the header" else 0)
    (adapter_copy / WEIGHTS_NAME).write_bytes(raw[:cut])
    msg = load_error(adapter_copy, AdapterError)
    assert msg.startswith(str(adapter_copy / WEIGHTS_NAME)) and "truncated" in msg
    assert "Traceback" not in msg and len(msg.splitlines()) == 1


def test_dtype_changed_in_the_header_fails_the_checksum(adapter_copy):
    raw = (adapter_copy / WEIGHTS_NAME).read_bytes()
    start = data_start(raw)
    header = raw[8:start].replace(b'"F32"', b'"I32"', 1)  # same size: the file stays valid safetensors
    assert header != raw[8:start]
    (adapter_copy / WEIGHTS_NAME).write_bytes(raw[:8] + header + raw[start:])
    assert "checksum" in load_error(adapter_copy, AdapterError)


def test_pickle_in_place_of_safetensors_is_never_unpickled(adapter_copy, tmp_path_factory):
    marker = tmp_path_factory.mktemp("pickle") / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Payload()}, adapter_copy / WEIGHTS_NAME)
    msg = load_error(adapter_copy, AdapterError)
    assert WEIGHTS_NAME in msg and "not a readable safetensors file" in msg
    assert not marker.exists()


def test_checksums_removed_from_the_metadata(adapter_copy):
    resave(adapter_copy, moetune_sha256=None)
    assert "lost the tensor checksums" in load_error(adapter_copy, AdapterError)


def test_tensor_added_after_save_is_refused(adapter_copy):
    with safe_open(str(adapter_copy / WEIGHTS_NAME), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    tensors["model.layers.0.mlp.router.extra"] = torch.zeros(2)
    save_file(tensors, str(adapter_copy / WEIGHTS_NAME), metadata=metadata)
    msg = load_error(adapter_copy, AdapterError)
    assert "checksums were recorded" in msg and "router.extra" in msg


def test_unknown_config_key_in_an_adapter_warns_naming_it(adapter_copy):
    data = json.loads((adapter_copy / CONFIG_NAME).read_text())
    data["future_knob"] = 3
    text = json.dumps(data, indent=2, sort_keys=True)
    resave(adapter_copy, moetune_config=text)
    (adapter_copy / CONFIG_NAME).write_text(text)
    with pytest.warns(UserWarning, match="future_knob") as record:
        model = moetune.MoEModel.from_pretrained(tiny_model("llama"), adapter_copy)
    assert any(WEIGHTS_NAME in str(w.message) for w in record if "future_knob" in str(w.message))
    assert model.moe_config == moetune.MoEConfig(num_experts=4, r=4)


@pytest.mark.parametrize(
    ("config_text", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"num_experts": 0}', "num_experts=0"),
    ],
)
def test_bad_config_in_the_metadata_names_the_file(adapter_copy, config_text, expected):
    resave(adapter_copy, moetune_config=config_text)
    msg = load_error(adapter_copy, AdapterError)
    assert str(adapter_copy / WEIGHTS_NAME) in msg and expected in msg


def test_checkpoint_resume_verifies_the_checksums(adapter_copy):
    """`MoETrainer` resumes through `load_adapter_weights`: a damaged checkpoint is refused there too."""
    raw = bytearray((adapter_copy / WEIGHTS_NAME).read_bytes())
    raw[-1] ^= 0x40
    (adapter_copy / WEIGHTS_NAME).write_bytes(bytes(raw))
    model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(num_experts=4, r=4))
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    with pytest.raises(AdapterError, match="checksum"):
        load_adapter_weights(model, adapter_copy)
    assert all(torch.equal(v, before[k]) for k, v in adapter_state_dict(model).items())  # nothing copied
