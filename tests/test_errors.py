"""Bad input ends with a message naming what is wrong, a non-zero exit, and no output file."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import run_bin


def _eval(model, data, out):
    return run_bin("kd-eval", "--model", model, "--data", data, "--out", out, "--device", "cpu", check=False)


def _generate(model, data, out):
    return run_bin("kd-generate", "--teacher", model, "--prompts", data, "--out", out, "--max-new-tokens", 2,
                   "--device", "cpu", check=False)


@pytest.mark.parametrize("stage", [_eval, _generate])
@pytest.mark.parametrize("content,message", [
    ('{"id": "a", "text": "fine"}\n{"id": "b", "text": oops}\n', "bad.jsonl:2: malformed JSON"),
    ('{"id": "a", "text": "fine"}\n{"text": "no id"}\n', "bad.jsonl:2: missing required field `id`"),
    ('{"id": "a", "text": "fine"}\n{"id": "b", "other": 1}\n', "bad.jsonl:2"),
    ("", "no records (empty file)"),
    ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "duplicate id `a`"),
])
def test_bad_records(stage, content, message, model_dirs, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    out = tmp_path / "out.json"
    proc = stage(model_dirs["llama"], data, out)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [data]  # no temporary files left either


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_model_type(model_dirs, text_data, tmp_path):
    model = _copy_model(model_dirs["llama"], tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out.json"
    proc = _eval(model, text_data, out)
    assert proc.returncode != 0 and "unknown model_type `mamba`" in proc.stderr
    assert not out.exists()


def test_missing_tensor_is_named(model_dirs, text_data, tmp_path):
    model = _copy_model(model_dirs["llama"], tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out.json"
    proc = _eval(model, text_data, out)
    assert proc.returncode != 0 and "missing tensor(s): model.layers.1.mlp.up_proj.weight" in proc.stderr
    assert not out.exists()


def test_unexpected_and_misshapen_tensors_are_named(model_dirs, text_data, tmp_path):
    model = _copy_model(model_dirs["llama"], tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    proc = _eval(model, text_data, tmp_path / "out.json")
    assert proc.returncode != 0 and "unexpected tensor(s)" in proc.stderr and "model.layers.0.extra.weight" in proc.stderr
    del tensors["model.layers.0.extra.weight"]
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:10].clone()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    proc = _eval(model, text_data, tmp_path / "out.json")
    assert proc.returncode != 0 and "`model.norm.weight` has shape [10]" in proc.stderr
    assert not (tmp_path / "out.json").exists()


def test_missing_model_directory(text_data, tmp_path):
    proc = _eval(tmp_path / "nope", text_data, tmp_path / "out.json")
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_sharded_and_bf16_checkpoints_load(model_dirs, text_data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"], dtype=torch.bfloat16)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    shutil.copy(f"{model_dirs['qwen2']}/tokenizer.json", sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    for dtype in ["f32", "bf16"]:
        out = tmp_path / f"{dtype}.json"
        run_bin("kd-eval", "--model", sharded, "--data", text_data, "--out", out, "--device", "cpu", "--dtype", dtype)
        assert json.loads(out.read_text())["dtype"] == {"f32": "float32", "bf16": "bfloat16"}[dtype]


def test_offline_hub_cache(model_dirs, text_data, tmp_path):
    """A hub id resolves from the HF cache layout with HF_HUB_OFFLINE=1 and no network."""
    home = tmp_path / "hf"
    snap = home / "hub" / "models--tiny--llama" / "snapshots" / "abc123"
    shutil.copytree(model_dirs["llama"], snap)
    (home / "hub" / "models--tiny--llama" / "refs").mkdir(parents=True)
    (home / "hub" / "models--tiny--llama" / "refs" / "main").write_text("abc123")
    out = tmp_path / "m.json"
    run_bin("kd-eval", "--model", "tiny/llama", "--data", text_data, "--out", out, "--device", "cpu",
            env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    local = tmp_path / "local.json"
    run_bin("kd-eval", "--model", model_dirs["llama"], "--data", text_data, "--out", local, "--device", "cpu")
    assert json.loads(out.read_text())["perplexity"] == json.loads(local.read_text())["perplexity"]
