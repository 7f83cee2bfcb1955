"""kd-distill end to end: loss values against PyTorch, exact resume, KD against CE-only,
offline logits, the progressive schedule, and refusals."""
import csv
import json

import pytest
import torch
from safetensors.torch import load_file

import reference
import tiny
from conftest import kill_after_checkpoint, run_bin, read_jsonl, write_jsonl

CORPUS = sorted(set(tiny.CORPUS))


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    recs = [{"id": f"c{i}", "text": t} for i, t in enumerate(CORPUS)]
    recs += [{"id": "p0", "prompt": "The quick brown", "completion": " fox jumps over the lazy dog."},
             {"id": "p1", "prompt": "A teacher model", "completion": " distills its knowledge."}]
    return write_jsonl(d / "train.jsonl", recs), recs


@pytest.fixture(scope="module")
def narrow_student(trained_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("students") / "narrow"
    run_bin("kd-init", "--teacher", trained_llama, "--out", out, "--layers", 2, "--heads", 2, "--kv-heads", 1,
            "--intermediate", 64, "--seed", 3, "--device", "cpu")
    return out


def test_first_step_losses_match_pytorch(trained_llama, narrow_student, corpus, tmp_path):
    data, recs = corpus
    out = tmp_path / "run"
    run_bin("kd-distill", "--teacher", trained_llama, "--student", narrow_student, "--data", data, "--out", out,
            "--steps", 1, "--batch-size", len(recs), "--alpha", 0.3, "--beta", 0.7, "--temperature", 2.0,
            "--hidden-weight", 0.5, "--attn-weight", 0.2, "--chunk", 7, "--device", "cpu")
    got = rows(out / "metrics.csv")[0]
    # kd-init's layer map for 2 of 3 layers is [0, 2].
    want = reference.distill_losses(trained_llama, str(narrow_student), recs, 2.0, [(0, 0), (1, 2)])
    for key in ["ce", "kd", "hidden", "attn"]:
        assert abs(float(got[key]) - want[key]) <= 1e-4 * max(1.0, abs(want[key])), (key, got[key], want[key])
    loss = 0.3 * want["ce"] + 0.7 * want["kd"] + 0.5 * want["hidden"] + 0.2 * want["attn"]
    assert abs(float(got["loss"]) - loss) <= 1e-4 * loss


def _distill(teacher, student, data, out, *extra):
    return run_bin("kd-distill", "--teacher", teacher, "--student", student, "--data", data, "--out", out,
                   "--batch-size", 4, "--lr", 3e-3, "--seed", 1, "--device", "cpu", *extra)


def test_killed_run_resumes_to_bit_identical_weights(trained_llama, narrow_student, corpus, tmp_path):
    data, _ = corpus
    args = ["--steps", 300, "--save-every", 7, "--hidden-weight", 0.5, "--grad-accum", 2]
    _distill(trained_llama, narrow_student, data, tmp_path / "straight", *args)
    interrupted = tmp_path / "interrupted"
    step = kill_after_checkpoint("kd-distill", ["--teacher", trained_llama, "--student", narrow_student, "--data", data,
                                                "--batch-size", 4, "--lr", 3e-3, "--seed", 1, "--device", "cpu", *args],
                                 interrupted, 21, timeout=60)
    assert step < 300
    resumed = _distill(trained_llama, narrow_student, data, interrupted, *args, "--resume")
    assert f"resuming at step {step}" in resumed.stderr
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(interrupted / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [int(r["step"]) for r in rows(interrupted / "metrics.csv")]
    assert steps == list(range(1, 301))


def test_resume_with_other_settings_says_so(trained_llama, narrow_student, corpus, tmp_path):
    data, _ = corpus
    out = tmp_path / "run"
    _distill(trained_llama, narrow_student, data, out, "--steps", 4, "--save-every", 2)
    proc = _distill(trained_llama, narrow_student, data, out, "--steps", 6, "--resume", "--temperature", 3)
    assert "settings differ" in proc.stderr and "temperature: 2.0 -> 3.0" in proc.stderr
    again = run_bin("kd-distill", "--teacher", trained_llama, "--student", narrow_student, "--data", data,
                    "--out", out, "--steps", 6, "--device", "cpu", check=False)
    assert again.returncode != 0 and "--resume" in again.stderr


def test_kd_transfers_the_teacher_distribution_that_ce_cannot(model_dirs, corpus, held_out, tmp_path):
    """A random, peaked teacher disagrees with the corpus: CE on the corpus cannot learn it,
    KD must. (The like-for-like comparison on a trained teacher is in docs/RESULTS.md.)"""
    data, _ = corpus
    teacher = model_dirs["llama"]
    student = tmp_path / "student"
    run_bin("kd-init", "--teacher", teacher, "--out", student, "--layers", 2, "--heads", 2, "--kv-heads", 1,
            "--seed", 3, "--device", "cpu")
    result = {}
    for name, weights in {"ce": ["--alpha", 1, "--beta", 0], "kd": ["--alpha", 0.5, "--beta", 0.5]}.items():
        out = tmp_path / name
        _distill(teacher, student, data, out, "--steps", 60, *weights)
        run_bin("kd-eval", "--model", out, "--teacher", teacher, "--data", held_out, "--out", tmp_path / f"{name}.json",
                "--device", "cpu")
        result[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["kd"]["teacher_kl"] < 0.8 * result["ce"]["teacher_kl"], result


def test_offline_logits_train_like_online(trained_llama, narrow_student, held_out, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"id": f"q{i}", "prompt": t[: len(t) // 3]} for i, t in enumerate(CORPUS)])
    gen = tmp_path / "transfer.jsonl"
    proc = run_bin("kd-generate", "--teacher", trained_llama, "--prompts", prompts, "--out", gen,
                   "--max-new-tokens", 24, "--temperature", 1.0, "--seed", 5, "--store-logits", 32, "--device", "cpu")
    assert "194 bytes per token" in proc.stdout
    sidecar = tmp_path / "transfer.jsonl.logits.safetensors"
    recs = read_jsonl(gen)
    stored = load_file(sidecar)
    assert stored["indices"].shape[0] == sum(len(r["completion_ids"]) for r in recs)
    kl = {}
    for mode, extra in {"online": [], "offline": ["--teacher-logits", sidecar]}.items():
        out = tmp_path / mode
        _distill(trained_llama, narrow_student, gen, out, "--steps", 40, "--alpha", 0, "--beta", 1,
                 "--temperature", 1, *extra)
        run_bin("kd-eval", "--model", out, "--teacher", trained_llama, "--data", held_out, "--out", tmp_path / f"{mode}.json",
                "--device", "cpu")
        kl[mode] = json.loads((tmp_path / f"{mode}.json").read_text())["teacher_kl"]
    assert abs(kl["offline"] - kl["online"]) / kl["online"] < 0.05, kl


def test_progressive_schedule_and_projection(trained_llama, corpus, text_data, tmp_path):
    data, _ = corpus
    student = tmp_path / "thin"
    run_bin("kd-init", "--teacher", trained_llama, "--out", student, "--layers", 2, "--hidden", 32, "--heads", 2,
            "--kv-heads", 1, "--intermediate", 64, "--device", "cpu")
    out = tmp_path / "run"
    _distill(trained_llama, student, data, out, "--steps", 12, "--schedule", "progressive", "--phase-steps", 3,
             "--hidden-weight", 1)
    phases = [r["phase"] for r in rows(out / "metrics.csv")]
    assert phases == ["layers<1"] * 3 + ["layers<2"] * 3 + ["full"] * 6
    saved = json.loads((out / "train_state" / "state.json").read_text())
    state = load_file(out / "train_state" / saved["tensors"])
    assert any(k.startswith("param.proj.") for k in state)
    # The exported student has no projection and loads in transformers with equal perplexity.
    exported = load_file(out / "model.safetensors")
    assert not any("proj." in k and "proj" == k.split(".")[0] for k in exported)
    run_bin("kd-eval", "--model", out, "--data", text_data, "--out", tmp_path / "m.json", "--device", "cpu")
    from conftest import TEXTS
    ours = json.loads((tmp_path / "m.json").read_text())["perplexity"]
    assert abs(ours - reference.perplexity(str(out), TEXTS)) / ours < 1e-4


@pytest.mark.parametrize("div", ["forward-kl", "reverse-kl", "jsd", "skew-kl", "tvd"])
def test_every_divergence_trains(div, trained_llama, narrow_student, corpus, tmp_path):
    data, _ = corpus
    out = tmp_path / div
    _distill(trained_llama, narrow_student, data, out, "--steps", 15, "--divergence", div, "--alpha", 0, "--beta", 1)
    r = rows(out / "metrics.csv")
    assert float(r[-1]["kd"]) < float(r[0]["kd"])


def test_vocabulary_mismatch_is_refused(trained_llama, narrow_student, corpus, tmp_path):
    from transformers import AutoModelForCausalLM
    import shutil

    other = tmp_path / "other"
    shutil.copytree(narrow_student, other)
    m = AutoModelForCausalLM.from_pretrained(other)
    m.resize_token_embeddings(320)
    m.save_pretrained(other)
    data, _ = corpus
    proc = run_bin("kd-distill", "--teacher", trained_llama, "--student", other, "--data", data, "--out",
                   tmp_path / "run", "--steps", 2, "--device", "cpu", check=False)
    assert proc.returncode != 0 and "does not match the teacher's" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_malformed_training_data_names_its_line(trained_llama, narrow_student, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": "a", "text": "ok"}\n{"id": "b", "text": "ok"}\n{"id": "c" "text": 1}\n')
    proc = run_bin("kd-distill", "--teacher", trained_llama, "--student", narrow_student, "--data", data, "--out",
                   tmp_path / "run", "--steps", 2, "--device", "cpu", check=False)
    assert proc.returncode != 0 and "bad.jsonl:3: malformed JSON" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_reduced_precision_trains_every_loss_and_resumes_exactly(dtype, trained_llama, narrow_student, corpus, tmp_path):
    """bf16 and f16 (loss-scaled) on the CPU: logits KD, hidden and attention matching together;
    the first step's losses are the fp32 step's to the dtype's precision; the masters stay fp32;
    a run stopped after 4 steps and resumed ends bit-identical to one of 8 (constant lr)."""
    data, _ = corpus
    args = ["--hidden-weight", 0.5, "--attn-weight", 0.5, "--warmup", 0, "--min-lr-ratio", 1.0]
    _distill(trained_llama, narrow_student, data, tmp_path / "f32", "--steps", 1, *args, "--dtype", "f32")
    args += ["--dtype", dtype]
    _distill(trained_llama, narrow_student, data, tmp_path / "straight", "--steps", 8, *args)
    _distill(trained_llama, narrow_student, data, tmp_path / "split", "--steps", 4, *args)
    _distill(trained_llama, narrow_student, data, tmp_path / "split", "--steps", 8, "--resume", *args)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in a.values()), "the exported masters are fp32"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{dtype}: {k} differs after resume"
    first = rows(tmp_path / "straight" / "metrics.csv")[0]
    want = rows(tmp_path / "f32" / "metrics.csv")[0]
    for term in ["ce", "kd", "hidden", "attn"]:
        got, ref = float(first[term]), float(want[term])
        assert ref > 0 and abs(got - ref) <= 0.02 * ref, f"{dtype} {term}: {got} vs fp32 {ref}"
    assert all(float(r["loss"]) == float(r["loss"]) for r in rows(tmp_path / "straight" / "metrics.csv"))
