"""kd-init: students built randomly, from teacher layers, or by pruning."""
import json

import pytest
import torch

import reference
import tiny
from conftest import TEXTS, HELD_OUT, run_bin


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_copy_all_layers_reproduces_teacher_and_loads_in_transformers(arch, model_dirs, text_data, tmp_path):
    out = tmp_path / "student"
    run_bin("kd-init", "--teacher", model_dirs[arch], "--out", out, "--init", "copy-layers", "--device", "cpu")
    text = TEXTS[1]
    assert torch.equal(reference.logits(str(out), text), reference.logits(model_dirs[arch], text))
    # Our perplexity on the saved checkpoint equals transformers' on it.
    run_bin("kd-eval", "--model", out, "--data", text_data, "--out", tmp_path / "m.json", "--device", "cpu")
    ours = json.loads((tmp_path / "m.json").read_text())["perplexity"]
    theirs = reference.perplexity(str(out), TEXTS)
    assert abs(ours - theirs) / theirs < 1e-4
    report = json.loads((out / "distillery_init.json").read_text())
    assert report["compression_ratio"] == 1.0
    assert report["layer_map"] == list(range(len(report["layer_map"])))


@pytest.mark.parametrize("init,extra", [
    ("random", ["--layers", 2, "--hidden", 32, "--heads", 2, "--kv-heads", 1, "--intermediate", 64]),
    ("copy-layers", ["--keep-layers", "0,2"]),
    ("prune", ["--layers", 2, "--hidden", 48, "--heads", 2, "--kv-heads", 1, "--intermediate", 96]),
])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_every_init_loads_in_transformers_with_equal_perplexity(arch, init, extra, model_dirs, text_data, tmp_path):
    if arch == "gpt2":
        extra = [e for e in extra]
        if "--kv-heads" in extra:
            i = extra.index("--kv-heads")
            del extra[i:i + 2]
        if init == "prune":  # gpt2 head width is hidden/heads: keep it at the teacher's 16
            extra[extra.index("--hidden") + 1] = 32
    if arch == "qwen3" and init == "prune":
        extra = ["--layers", 2, "--hidden", 48, "--heads", 2, "--kv-heads", 1, "--intermediate", 96]
    out = tmp_path / "student"
    calib = ["--calib", text_data] if init == "prune" else []
    run_bin("kd-init", "--teacher", model_dirs[arch], "--out", out, "--init", init, *extra, *calib,
            "--device", "cpu")
    run_bin("kd-eval", "--model", out, "--data", text_data, "--out", tmp_path / "m.json", "--device", "cpu")
    ours = json.loads((tmp_path / "m.json").read_text())["perplexity"]
    theirs = reference.perplexity(str(out), TEXTS)
    assert abs(ours - theirs) / theirs < 1e-4
    report = json.loads((out / "distillery_init.json").read_text())
    assert report["student_params"] < report["teacher_params"]
    assert report["student_weights_bytes_on_disk"] < report["teacher_weights_bytes_on_disk"]


def test_pruned_student_beats_random_student_of_same_shape(trained_llama, text_data, held_out, tmp_path):
    shape = ["--layers", 2, "--hidden", 48, "--intermediate", 64, "--heads", 4, "--kv-heads", 2]
    ppl = {}
    for init in ["random", "prune"]:
        out = tmp_path / init
        calib = ["--calib", text_data] if init == "prune" else []
        run_bin("kd-init", "--teacher", trained_llama, "--out", out, "--init", init, *shape, *calib, "--device", "cpu")
        run_bin("kd-eval", "--model", out, "--data", held_out, "--out", tmp_path / f"{init}.json", "--device", "cpu")
        ppl[init] = json.loads((tmp_path / f"{init}.json").read_text())["perplexity"]
    assert ppl["prune"] < 0.5 * ppl["random"], ppl


@pytest.mark.parametrize("args,message", [
    (["--layers", 9], "only 3 layers"),
    (["--hidden", 60, "--heads", 8], "do not divide the hidden width"),
    (["--heads", 4, "--kv-heads", 3], "does not divide"),
    (["--init", "prune"], "needs --calib"),
    (["--init", "copy-layers", "--hidden", 32, "--heads", 2], "widths must match"),
])
def test_impossible_specs_fail_cleanly(args, message, model_dirs, tmp_path):
    out = tmp_path / "student"
    proc = run_bin("kd-init", "--teacher", model_dirs["llama"], "--out", out, *args, "--device", "cpu", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert not out.exists()


def test_config_with_another_vocabulary_is_refused(model_dirs, tmp_path):
    cfg = json.loads(open(f"{model_dirs['qwen2']}/config.json").read())
    cfg["vocab_size"] = 1000
    path = tmp_path / "other.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "student"
    proc = run_bin("kd-init", "--teacher", model_dirs["llama"], "--out", out, "--config", path, check=False)
    assert proc.returncode != 0 and "vocab_size 1000" in proc.stderr
    assert not out.exists()


def test_config_builds_another_architecture(model_dirs, text_data, tmp_path):
    cfg = json.loads(open(f"{model_dirs['qwen3']}/config.json").read())
    cfg["num_hidden_layers"] = 1
    path = tmp_path / "qwen3-student.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "student"
    run_bin("kd-init", "--teacher", model_dirs["llama"], "--out", out, "--config", path, "--device", "cpu")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"
    run_bin("kd-eval", "--model", out, "--data", text_data, "--out", tmp_path / "m.json", "--device", "cpu")
    ours = json.loads((tmp_path / "m.json").read_text())["perplexity"]
    assert abs(ours - reference.perplexity(str(out), TEXTS)) / ours < 1e-4
