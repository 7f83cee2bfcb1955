"""On-policy distillation (kd-distill --on-policy): the student samples, the teacher scores
every sampled token, and the loss is TRL's generalized JSD over completion tokens only."""
import csv
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import run_bin, write_jsonl

# Prompts of different lengths, so that the sampled batch is padded.
PROMPTS = [[0, 17, 42, 99, 5, 61], [0, 8, 230], [0, 77, 14, 140, 33], [0, 190]]
MAX_NEW = 7
TEMPERATURE = 2.0


def rows(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def load(model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


@pytest.fixture(scope="module")
def student(trained_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("op-student") / "student"
    run_bin("kd-init", "--teacher", trained_llama, "--out", out, "--layers", 1, "--seed", 2, "--device", "cpu")
    return out


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Prompt-only records (stored ids, so no tokenizer rule is involved)."""
    d = tmp_path_factory.mktemp("op-data")
    return write_jsonl(d / "prompts.jsonl", [{"id": f"p{i}", "prompt_ids": p, "completion_ids": []} for i, p in enumerate(PROMPTS)])


def greedy(model, prompt, eos):
    """The student's greedy completion of one prompt, stopping at (and keeping) EOS."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(MAX_NEW):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt in eos:
                break
    return ids


def generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's `generalized_jsd_loss` (GKDTrainer), reduction batchmean over labelled tokens."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture = torch.logsumexp(torch.stack([student_log_probs + torch.log(1 - b), teacher_log_probs + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True) + \
            (1 - b) * F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


@pytest.mark.parametrize("jsd_beta", [0.0, 0.5, 1.0])
def test_on_policy_loss_and_gradient_match_trl_gkd(jsd_beta, trained_llama, student, prompts, tmp_path):
    out = tmp_path / "run"
    run_bin("kd-distill", "--teacher", trained_llama, "--student", student, "--data", prompts, "--out", out,
            "--on-policy", 1, "--gen-temperature", 0, "--gen-max-new-tokens", MAX_NEW, "--divergence", "jsd",
            "--jsd-beta", jsd_beta, "--temperature", TEMPERATURE, "--alpha", 0.5, "--beta", 0.7, "--steps", 1,
            "--batch-size", len(PROMPTS), "--chunk", 5, "--device", "cpu")
    got = rows(out)[0]
    s_model, t_model = load(student), load(trained_llama)
    eos = {s_model.generation_config.eos_token_id} if isinstance(s_model.generation_config.eos_token_id, int) \
        else set(s_model.generation_config.eos_token_id)
    seqs = [greedy(s_model, p, eos) for p in PROMPTS]
    # Right-padded batch with labels on completion tokens only, as TRL builds it.
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    labels = torch.full_like(ids, -100)
    for r, (s, p) in enumerate(zip(seqs, PROMPTS)):
        labels[r, len(p):len(s)] = ids[r, len(p):len(s)]
    s_model.train()
    s_logits = s_model(ids, attention_mask=mask).logits[:, :-1].double()
    with torch.no_grad():
        t_logits = t_model(ids, attention_mask=mask).logits[:, :-1].double()
    jsd = generalized_jsd_loss(s_logits, t_logits, labels[:, 1:], jsd_beta, TEMPERATURE)
    # Distillery scales the divergence by T^2 (Hinton et al.); TRL does not.
    kd = jsd * TEMPERATURE ** 2
    assert float(got["on_policy"]) == 1.0
    assert float(got["sampled_tokens"]) == pytest.approx(sum(len(s) - len(p) for s, p in zip(seqs, PROMPTS)) / len(PROMPTS))
    assert float(got["ce"]) == 0.0, "no CE on the student's own samples"
    assert float(got["kd"]) == pytest.approx(kd.item(), rel=1e-5)
    assert float(got["loss"]) == pytest.approx(0.7 * kd.item(), rel=1e-5)
    (0.7 * kd).backward()
    norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in s_model.parameters() if p.grad is not None))
    assert float(got["grad_norm"]) == pytest.approx(norm, rel=1e-4)
    # The three betas are three different losses.
    if jsd_beta == 0.5:
        ends = [generalized_jsd_loss(s_logits, t_logits, labels[:, 1:], b, TEMPERATURE).item() for b in (0.0, 1.0)]
        assert all(abs(e - jsd.item()) > 0.05 * jsd.item() for e in ends)


def test_on_policy_mix_is_deterministic_and_resumes_exactly(trained_llama, student, prompts, tmp_path):
    """Lambda 0.5 with sampling at temperature 1: the same seed gives the same samples and
    weights, and a run stopped after 3 steps and resumed ends bit-identical to one of 6."""
    # Completions for the off-policy batches.
    data = write_jsonl(tmp_path / "data.jsonl", [{"id": f"p{i}", "prompt_ids": p, "completion_ids": [9, 10, 11]}
                                                 for i, p in enumerate(PROMPTS)])
    args = ["--teacher", trained_llama, "--student", student, "--data", data, "--on-policy", 0.5,
            "--gen-max-new-tokens", 5, "--batch-size", 2, "--grad-accum", 2, "--warmup", 0, "--min-lr-ratio", 1,
            "--lr", 3e-3, "--seed", 4, "--device", "cpu"]
    run_bin("kd-distill", *args, "--out", tmp_path / "a", "--steps", 6)
    run_bin("kd-distill", *args, "--out", tmp_path / "b", "--steps", 6)
    run_bin("kd-distill", *args, "--out", tmp_path / "c", "--steps", 3)
    run_bin("kd-distill", *args, "--out", tmp_path / "c", "--steps", 6, "--resume")
    a, b, c = (load_file(tmp_path / d / "model.safetensors") for d in "abc")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: the same seed trained different weights"
        assert torch.equal(a[k], c[k]), f"{k}: the resumed run differs"
    shares = [float(r["on_policy"]) for r in rows(tmp_path / "a")]
    assert set(shares) <= {0.0, 0.5, 1.0} and 0 < sum(shares) < len(shares), shares
    assert [r["kd"] for r in rows(tmp_path / "a")] == [r["kd"] for r in rows(tmp_path / "c")]


def test_on_policy_refusals(trained_llama, student, prompts, tmp_path):
    base = ["--teacher", trained_llama, "--student", student, "--data", prompts, "--out", tmp_path / "x",
            "--steps", 1, "--device", "cpu"]
    bad = run_bin("kd-distill", *base, "--on-policy", 1.5, check=False)
    assert bad.returncode != 0 and "--on-policy must be a probability" in bad.stderr
    no_teacher = run_bin("kd-distill", "--student", student, "--data", prompts, "--out", tmp_path / "y", "--steps", 1,
                         "--on-policy", 1, "--device", "cpu", check=False)
    assert no_teacher.returncode != 0 and "need a live teacher" in no_teacher.stderr
    text = write_jsonl(tmp_path / "text.jsonl", [{"id": "t", "text": "In the beginning"}])
    no_prompt = run_bin("kd-distill", *base[:5], text, *base[6:], "--on-policy", 0.5, check=False)
    assert no_prompt.returncode != 0 and "have no `prompt`" in no_prompt.stderr


def test_sampled_token_estimate_matches_its_pytorch_reference(trained_llama, student, prompts, tmp_path):
    """--on-policy-estimator sampled-token: the KD term is the mean over sampled tokens of
    log q(y) - log p(y), and the gradient that of sum(sg(log q - log p) * log q) / n (the
    score-function estimate of the reverse KL's gradient)."""
    out = tmp_path / "run"
    run_bin("kd-distill", "--teacher", trained_llama, "--student", student, "--data", prompts, "--out", out,
            "--on-policy", 1, "--on-policy-estimator", "sampled-token", "--gen-temperature", 0, "--gen-max-new-tokens", MAX_NEW,
            "--temperature", 1, "--alpha", 0.5, "--beta", 0.7, "--steps", 1, "--batch-size", len(PROMPTS), "--chunk", 5,
            "--device", "cpu")
    got = rows(out)[0]
    s_model, t_model = load(student), load(trained_llama)
    eos = {s_model.generation_config.eos_token_id} if isinstance(s_model.generation_config.eos_token_id, int) \
        else set(s_model.generation_config.eos_token_id)
    seqs = [greedy(s_model, p, eos) for p in PROMPTS]
    s_model.train()
    total, n = 0.0, 0
    estimate_sum = torch.zeros((), dtype=torch.float64)
    for s, p in zip(seqs, PROMPTS):
        ids = torch.tensor([s])
        s_lp = F.log_softmax(s_model(ids).logits[0, :-1].double(), -1)
        with torch.no_grad():
            t_lp = F.log_softmax(t_model(ids).logits[0, :-1].double(), -1)
        tgt = ids[0, 1:]
        pos = torch.arange(len(p) - 1, len(s) - 1)
        lq = s_lp[pos, tgt[pos]]
        lp = t_lp[pos, tgt[pos]]
        est = lq.detach() - lp
        total += est.sum().item()
        n += len(pos)
        estimate_sum = estimate_sum + (est * lq).sum()
    assert float(got["ce"]) == 0.0
    assert float(got["kd"]) == pytest.approx(total / n, rel=1e-5)
    (0.7 * estimate_sum / n).backward()
    norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in s_model.parameters() if p.grad is not None))
    assert float(got["grad_norm"]) == pytest.approx(norm, rel=1e-4)
    # Only for on-policy batches.
    bad = run_bin("kd-distill", "--teacher", trained_llama, "--student", student, "--data", prompts, "--out", tmp_path / "x",
                  "--on-policy-estimator", "sampled-token", "--steps", 1, "--device", "cpu", check=False)
    assert bad.returncode != 0 and "set --on-policy above 0" in bad.stderr, bad.stderr
