"""Adapter-only save/load: the files, their content, a bit-exact reload in a fresh process, config JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors import safe_open

import moetune
from moetune.config import CONFIG_NAME
from moetune.serialization import WEIGHTS_NAME

try:
    from tests.tiny_models import tiny_batch, tiny_model
except ImportError:  # pragma: no cover - depends on how pytest sets sys.path
    from tiny_models import tiny_batch, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTER_PARTS = ("experts.", "router.", "lora.", "trained.")


def train(model: moetune.MoEModel, family: str, steps: int = 3) -> None:
    """A few AdamW steps (B becomes nonzero) with the aux-free bias update after each."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(steps):
        opt.zero_grad()
        model(**tiny_batch(family, batch=4, seq=8, seed=step)).loss.backward()
        opt.step()
        model.update_expert_bias()
    model.eval()


def eval_inputs(family: str) -> dict:
    batch = tiny_batch(family, seed=11)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def saved_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(path, WEIGHTS_NAME), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)


# ------------------------------------------------------------------------ what is written


def test_save_writes_two_files_with_adapter_tensors_only(tmp_path):
    cfg = moetune.MoEConfig(
        num_experts=4, r=4, attn_r=2, num_shared_experts=1, bias_update_rate=0.1, modules_to_save=["lm_head"]
    )
    model = moetune.get_moe_model(tiny_model("llama"), cfg)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])

    tensors = saved_tensors(tmp_path)
    adapter_names = [name for name, _ in model.adapter_modules()]
    for key in tensors:
        assert "base_layer" not in key and "original." not in key, key
        owner = [a for a in adapter_names if key.startswith(a + ".")]
        assert owner, f"{key} belongs to no moetune module"
        assert key[len(owner[0]) + 1 :].startswith(ADAPTER_PARTS), key
    # every trainable parameter is saved (by name, module path inside the base model) ...
    trainable = {n.removeprefix("base_model."): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) <= set(tensors)
    for name, p in trainable.items():
        assert torch.equal(tensors[name], p.detach()), name
    # ... and, besides them, only the routers' expert_bias buffers
    extra = set(tensors) - set(trainable)
    assert extra and all(k.endswith("router.expert_bias") for k in extra)
    assert len(extra) == len(list(model.moe_layers()))
    # every kind of adapter tensor is there
    assert {part for part in ADAPTER_PARTS for k in tensors if f".{part}" in k} == set(ADAPTER_PARTS)
    with open(tmp_path / CONFIG_NAME) as fh:
        data = json.load(fh)
    assert {k: v for k, v in data.items() if not k.startswith("_")} == cfg.to_dict()


def test_saved_file_is_small_compared_with_the_base(tmp_path):
    base = tiny_model("llama")
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    model = moetune.get_moe_model(base, moetune.MoEConfig(num_experts=2, r=2))
    model.save_pretrained(tmp_path)
    size = os.path.getsize(tmp_path / WEIGHTS_NAME)
    assert size < 0.15 * base_bytes, (size, base_bytes)


# ------------------------------------------------------------------------ reload in a fresh process

RELOAD_CASES = {
    "llama_ffn": (
        "llama",
        dict(
            num_experts=4,
            top_k=2,
            r=4,
            attn_r=2,
            num_shared_experts=1,
            bias_update_rate=0.1,
            modules_to_save=["lm_head"],
        ),
    ),
    "gpt2_linear": ("gpt2", dict(expert_type="linear", router="threshold", num_experts=3, r=2)),
    "bert_linear": (
        "bert",
        dict(
            expert_type="linear",
            num_experts=4,
            top_k=1,
            r=2,
            bias_update_rate=0.1,
            modules_to_save=["classifier"],
        ),
    ),
    "phi3_ffn": ("phi3", dict(router="switch", num_experts=[2, 3], r=2, capacity_factor=1.0)),
}

RELOAD_SCRIPT = """
import json, sys, torch, moetune
from tests.tiny_models import tiny_batch, tiny_model
torch.set_num_threads(int(sys.argv[2]))  # as in the test process: same kernels, same rounding
for family, path, out in json.loads(sys.argv[1]):
    model = moetune.MoEModel.from_pretrained(tiny_model(family, seed=0), path)
    batch = tiny_batch(family, seed=11)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    frozen = not any(p.requires_grad for p in model.parameters())
    torch.save({"logits": logits, "frozen": frozen, "training": model.training}, out)
"""


def test_reload_in_fresh_process_gives_identical_logits(tmp_path):
    jobs, expected, bias_matters = [], {}, {}
    for case, (family, kw) in RELOAD_CASES.items():
        model = moetune.get_moe_model(tiny_model(family, seed=0), moetune.MoEConfig(lora_dropout=0.0, **kw))
        train(model, family)
        assert any(bool(B.abs().max() > 0) for n, B in model.named_parameters() if "lora_B" in n)
        with torch.no_grad():
            expected[case] = model(**eval_inputs(family)).logits
        path = tmp_path / case
        model.save_pretrained(path)
        jobs.append((family, str(path), str(tmp_path / f"{case}.pt")))

        # the test is sensitive to what must be saved: the bias and the trained copy change the logits
        with torch.no_grad():
            if kw.get("bias_update_rate"):
                biases = [layer.router.expert_bias for _, layer in model.moe_layers()]
                assert any(bool(b.abs().max() > 0) for b in biases), case
                kept = [b.clone() for b in biases]
                for b in biases:
                    b.zero_()
                bias_matters[case] = not torch.equal(model(**eval_inputs(family)).logits, expected[case])
                for b, k in zip(biases, kept, strict=True):
                    b.copy_(k)
            for name in kw.get("modules_to_save", []):
                copy_ = model.get_base_model().get_submodule(name)
                assert not torch.equal(copy_.trained.weight, copy_.original.weight), case

    # (BERT's logits read only [CLS]: there a moved bias may happen not to change them)
    assert bias_matters["llama_ffn"], bias_matters

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, json.dumps(jobs), str(torch.get_num_threads())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, (_, _, out) in zip(RELOAD_CASES, jobs, strict=True):
        got = torch.load(out)
        assert torch.equal(got["logits"], expected[case]), (
            case,
            float((got["logits"] - expected[case]).abs().max()),
        )
        assert got["frozen"] and not got["training"], case


def test_from_pretrained_trainable_and_frozen(tmp_path):
    cfg = moetune.MoEConfig(num_experts=2, r=2, attn_r=2, modules_to_save=["lm_head"])
    moetune.get_moe_model(tiny_model("llama"), cfg).save_pretrained(tmp_path)

    frozen = moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())
    assert frozen.moe_config == cfg

    trainable = moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    injected = moetune.get_moe_model(tiny_model("llama"), cfg)
    expected = {n for n, p in injected.named_parameters() if p.requires_grad}
    assert names == expected and names


# ------------------------------------------------------------------------ config JSON

CONFIGS = [
    moetune.MoEConfig(),
    moetune.MoEConfig(
        expert_type="linear",
        num_experts=[2, 4],
        top_k=1,
        router="switch",
        capacity_factor=2.0,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
        bias_update_rate=0.01,
        use_rslora=True,
    ),
    moetune.MoEConfig(router="threshold", threshold_max=0.5, target_modules=r".*\.mlp\.(up|down)_proj"),
    moetune.MoEConfig(
        router="topp", top_p=0.6, attn_r=4, attn_target_modules=["q_proj"], num_shared_experts=2
    ),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_config_json_round_trip(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = moetune.MoEConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json()) == cfg.to_dict()


def test_config_unknown_keys_warn_and_are_ignored():
    data = json.loads(moetune.MoEConfig(num_experts=3, top_k=1).to_json())
    data["future_knob"] = 1
    data["another"] = "x"
    with pytest.warns(UserWarning, match="future_knob") as record:
        cfg = moetune.MoEConfig.from_json(json.dumps(data))
    assert any("another" in str(w.message) for w in record)
    assert cfg == moetune.MoEConfig(num_experts=3, top_k=1)
    assert not hasattr(cfg, "future_knob")


def test_saved_config_loads_without_warnings(tmp_path):
    cfg = moetune.MoEConfig(num_experts=2, r=2)
    moetune.get_moe_model(tiny_model("llama"), cfg).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, extras = moetune.MoEConfig.load(tmp_path)
    assert loaded == cfg
    assert all(k.startswith("_") for k in extras)
