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
from safetensors.torch import save_file

import moetune
from moetune.config import CONFIG_NAME
from moetune.io import adapter as adapter_format
from moetune.io.adapter import WEIGHTS_NAME
from moetune.io.provenance import BaseMismatchError, base_parameters, fingerprint
from tests.helpers.tiny_models import tiny_batch, tiny_chat_tokenizer, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
from tests.helpers.tiny_models import tiny_batch, tiny_model
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


# ------------------------------------------------------------------------ atomic replacement

OLD_CFG = dict(num_experts=2, r=2)
NEW_CFG = dict(num_experts=4, r=4, attn_r=2)  # other shapes and other tensors: a mix cannot load


def adapter_of(cfg_kw: dict, path) -> tuple[moetune.MoEConfig, dict[str, torch.Tensor]]:
    model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(**cfg_kw))
    for p in model.parameters():
        if p.requires_grad:  # every tensor nonzero and distinct from the other adapter's
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(path)
    return model.moe_config, {k: v.clone() for k, v in adapter_format.adapter_state_dict(model).items()}


def loaded_adapter(path) -> tuple[moetune.MoEConfig, dict[str, torch.Tensor]]:
    model = moetune.MoEModel.from_pretrained(tiny_model("llama"), path)
    return model.moe_config, adapter_format.adapter_state_dict(model)


class SimulatedCrash(Exception):
    pass


@pytest.mark.parametrize(
    "crash_at", ["writing weights", "renaming weights", "writing config", "renaming config"]
)
def test_interrupted_save_leaves_the_complete_old_or_new_adapter(tmp_path, monkeypatch, crash_at):
    """A save that dies at any step leaves one complete adapter: the old one until the weights' rename."""
    old_cfg, old = adapter_of(OLD_CFG, tmp_path)
    model = moetune.get_moe_model(tiny_model("llama"), moetune.MoEConfig(**NEW_CFG))
    torch.nn.init.normal_(next(p for p in model.parameters() if p.requires_grad), std=0.1)
    new = {k: v.clone() for k, v in adapter_format.adapter_state_dict(model).items()}

    writes, renames = [], []
    real_save_file, real_write_text, real_replace = (
        adapter_format.save_file,
        adapter_format.atomic_write_text,
        os.replace,
    )

    def save_file(tensors, tmp, metadata):
        if crash_at == "writing weights":
            with open(tmp, "wb") as fh:
                fh.write(b"\x00" * 100)  # half a file
            raise SimulatedCrash
        real_save_file(tensors, tmp, metadata=metadata)

    def write_text(path, text):
        writes.append(path)
        if crash_at == "writing config":
            raise SimulatedCrash
        real_write_text(path, text)

    def replace(src, dst):
        renames.append(dst)
        if crash_at == f"renaming {'weights' if dst.endswith(WEIGHTS_NAME) else 'config'}":
            raise SimulatedCrash
        real_replace(src, dst)

    monkeypatch.setattr(adapter_format, "save_file", save_file)
    monkeypatch.setattr(adapter_format, "atomic_write_text", write_text)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SimulatedCrash):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()

    committed = crash_at in ("writing config", "renaming config")  # the weights' rename had happened
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg, got = loaded_adapter(tmp_path)
    want_cfg, want = (model.moe_config, new) if committed else (old_cfg, old)
    assert cfg == want_cfg
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the stale json of an interrupted save is noticed, never used
    assert any(CONFIG_NAME in str(w.message) and "interrupted" in str(w.message) for w in caught) == committed
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temporary file left


def test_hand_edited_json_warns_and_the_weights_config_wins(tmp_path):
    cfg, _ = adapter_of(OLD_CFG, tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    data["top_k"] = 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"differs from the config stored in .*\['top_k'\]"):
        loaded, _ = loaded_adapter(tmp_path)
    assert loaded == cfg and loaded.top_k == 2


def test_weights_file_alone_is_a_complete_adapter(tmp_path):
    cfg, saved = adapter_of(NEW_CFG, tmp_path)
    os.unlink(tmp_path / CONFIG_NAME)
    loaded, got = loaded_adapter(tmp_path)
    assert loaded == cfg and all(torch.equal(got[k], saved[k]) for k in saved)


def test_files_without_metadata_from_older_versions_still_load(tmp_path):
    """Adapters written before format 1: the config from the json, no checksums to verify."""
    cfg, saved = adapter_of(OLD_CFG, tmp_path)
    save_file(saved, str(tmp_path / WEIGHTS_NAME), metadata={"format": "pt"})
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({k: v for k, v in data.items() if not k.startswith("_")}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, got = loaded_adapter(tmp_path)
    assert loaded == cfg and all(torch.equal(got[k], saved[k]) for k in saved)
    with pytest.raises(BaseMismatchError, match="no base-model fingerprint"):
        moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path, strict=True)


# ------------------------------------------------------------------------ checksums and provenance


def test_metadata_holds_config_checksums_and_provenance(tmp_path):
    from importlib.metadata import version

    import transformers

    cfg, saved = adapter_of(NEW_CFG, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as fh:
        metadata = fh.metadata()
    text = (tmp_path / CONFIG_NAME).read_text()
    assert metadata[adapter_format.META_CONFIG] == text and metadata[adapter_format.META_FORMAT] == "1"
    sums = json.loads(metadata[adapter_format.META_SHA256])
    assert sums == {k: adapter_format.tensor_sha256(v) for k, v in saved.items()}
    zeros = [torch.zeros(4), torch.zeros(2, 2), torch.zeros(4, dtype=torch.int32)]  # same bytes
    assert len({adapter_format.tensor_sha256(t) for t in zeros}) == 3  # dtype and shape enter the digest

    data = json.loads(text)
    assert {k: v for k, v in data.items() if not k.startswith("_")} == cfg.to_dict()
    base = tiny_model("llama")
    assert data["_base_model"] == base.config._name_or_path
    assert data["_base_fingerprint"] == fingerprint(base) and data["_base_fingerprint"].startswith("sha256:")
    assert "_base_revision" in data
    assert data["_versions"] == {
        "moetune": version("moetune"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": version("safetensors"),
    }


def test_base_revision_and_name_are_recorded(tmp_path):
    base = tiny_model("llama")
    base.config._name_or_path, base.config._commit_hash = "org/tiny-llama", "0123abc"
    moetune.get_moe_model(base, moetune.MoEConfig(num_experts=2, r=2)).save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (data["_base_model"], data["_base_revision"]) == ("org/tiny-llama", "0123abc")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_fingerprint_is_the_same_with_or_without_the_adapter(family):
    raw = tiny_model(family)
    before = fingerprint(raw)
    kw = dict(expert_type="linear", modules_to_save=["classifier"]) if family == "bert" else {}
    moe = moetune.get_moe_model(raw, moetune.MoEConfig(num_experts=2, r=2, attn_r=2, **kw))
    torch.nn.init.normal_(next(p for p in moe.parameters() if p.requires_grad))
    assert fingerprint(moe) == fingerprint(raw) == before
    assert [n for n, _ in base_parameters(moe)] == [n for n, _ in tiny_model(family).named_parameters()]


def test_fingerprint_changes_with_the_base():
    base = tiny_model("llama")
    ref = fingerprint(base)
    assert fingerprint(tiny_model("llama")) == ref  # deterministic
    assert fingerprint(tiny_model("llama", seed=1)) != ref  # other weights
    assert fingerprint(tiny_model("llama", dtype=torch.bfloat16)) != ref  # other dtype
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight.view(-1)[-1] += 1.0  # one sampled value (the last)
    assert fingerprint(base) != ref


def test_other_base_warns_naming_both_and_strict_raises(tmp_path):
    adapter_of(OLD_CFG, tmp_path)
    trained_on = json.loads((tmp_path / CONFIG_NAME).read_text())["_base_fingerprint"]
    other = tiny_model("llama", seed=1)
    other.config._name_or_path = "other-llama"
    with pytest.warns(UserWarning, match="trained on base model") as record:
        moetune.MoEModel.from_pretrained(other, tmp_path)
    msg = next(str(w.message) for w in record if "trained on base model" in str(w.message))
    assert trained_on[:23] in msg and fingerprint(tiny_model("llama", seed=1))[:23] in msg
    assert "other-llama" in msg and str(tmp_path) in msg

    base = tiny_model("llama", seed=1)
    before = [type(m) for m in base.modules()]
    with pytest.raises(BaseMismatchError, match="trained on base model"):
        moetune.MoEModel.from_pretrained(base, tmp_path, strict=True)
    assert [type(m) for m in base.modules()] == before  # left untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right base: no warning, strict passes
        moetune.MoEModel.from_pretrained(tiny_model("llama"), tmp_path, strict=True)


# ------------------------------------------------------------------------ the CLI finds the base


@pytest.fixture(scope="module")
def yaml_run(tmp_path_factory):
    """`moetune train c.yaml` on a tiny local model, data paths relative to the training directory."""
    from moetune.app.cli import main

    root = tmp_path_factory.mktemp("yaml_run")
    model_dir = root / "tiny-llama"
    tokenizer = tiny_chat_tokenizer()
    base = tiny_model("llama")
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"prompt": f"Review: {w} film {i}", "response": a} for i in range(12) for w, a in GOOD_BAD]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    (root / "c.yaml").write_text(
        "model: tiny-llama\n"
        "moe: {num_experts: 2, top_k: 1, r: 2, lora_dropout: 0.0}\n"
        "data: {train: [train.jsonl], test: [test.jsonl], max_length: 16, "
        "options: {default: [positive, negative]}}\n"
        "training: {per_device_train_batch_size: 8, max_steps: 2, disable_tqdm: true}\n"
    )
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", "c.yaml", "--output-dir", "out"]) == 0
    finally:
        os.chdir(cwd)
    with open(root / "out" / "metrics.json") as fh:
        return root, json.load(fh)


GOOD_BAD = (("good", "positive"), ("bad", "negative"))


def test_convert_to_mixlora_finds_the_base_export_finds(yaml_run, tmp_path, monkeypatch):
    """No --base, no --act-fn: the activation comes from the base the run record names (relative to
    the directory the run started in), as `export` and `generate` find it."""
    from moetune.app.cli import main
    from moetune.interop import mixlora

    root, _ = yaml_run
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "--to", "mixlora", str(root / "out" / "adapter"), "mix"]) == 0
    with open(tmp_path / "mix" / mixlora.MIXLORA_CONFIG) as fh:
        assert json.load(fh)["act_fn"] == "silu"


def test_eval_of_a_yaml_run_from_another_directory(yaml_run, tmp_path, monkeypatch, capsys):
    from moetune.app.cli import main

    root, metrics = yaml_run
    adapter = root / "out" / "adapter"
    provenance = json.loads((adapter / CONFIG_NAME).read_text())
    assert provenance["_base_model"] == str(root / "tiny-llama")  # from the config's folder
    monkeypatch.chdir(tmp_path)  # neither the model nor the data paths resolve from here
    assert main(["eval", "--adapter", str(adapter)]) == 0
    assert json.loads(capsys.readouterr().out) == metrics["after"]


def test_generate_without_run_record_uses_the_provenance(yaml_run, tmp_path, monkeypatch, capsys):
    from moetune.app.cli import main

    root, _ = yaml_run
    adapter = tmp_path / "adapter"
    os.makedirs(adapter)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (adapter / name).write_bytes((root / "out" / "adapter" / name).read_bytes())
    monkeypatch.chdir(root)  # the provenance names the base relative to where training ran
    assert main(["generate", "--adapter", str(adapter), "--prompt", "Review: good film 3"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["eval", "--adapter", str(adapter)]) == 2  # held-out data need the run record
    err = capsys.readouterr().err
    assert "moetune_run.json: no run record" in err and len(err.strip().splitlines()) == 1


def test_eval_with_a_missing_base_is_one_clear_line(yaml_run, tmp_path, capsys):
    from moetune.app.cli import main

    root, _ = yaml_run
    adapter = tmp_path / "adapter"
    os.makedirs(adapter)
    for name in (CONFIG_NAME, WEIGHTS_NAME, "moetune_run.json"):
        (adapter / name).write_bytes((root / "out" / "adapter" / name).read_bytes())
    record = json.loads((adapter / "moetune_run.json").read_text())
    assert os.path.isabs(record["model"]) and os.path.isdir(record["model"])
    record["model"] = str(tmp_path / "moved-away")
    (adapter / "moetune_run.json").write_text(json.dumps(record))
    assert main(["eval", "--adapter", str(adapter)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "cannot find its base model" in err and "moved-away" in err and str(adapter) in err
