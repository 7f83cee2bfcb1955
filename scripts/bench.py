"""`make bench`: Distillery against the PyTorch reference (scripts/bench_reference.py) on
the same shapes, data sizes, batch and sequence length, in one run; writes the table with
ratios into docs/BENCHMARKS.md.

    python scripts/bench.py --out docs/BENCHMARKS.md            # CPU case (a few minutes)
    python scripts/bench.py --gpu --out docs/BENCHMARKS-gpu.md  # GPU case (Llama-3.2 1B/3B shapes)

Each side runs in its own process; peak memory is that process's max RSS (CPU) or, on a
GPU, the device memory in use sampled with nvidia-smi. Step time excludes start-up: it is
the mean over steps after the warm-up ones.
"""
import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
sys.path.insert(0, str(ROOT / "tests"))
import tiny  # noqa: E402

CPU_SHAPES = {
    "teacher": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=8192),
    "student": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=8192),
    "batch": 8, "seq": 128, "steps": 30, "warmup": 5, "gen_batch": 8, "gen_new": 64, "prompt_len": 16,
}
# Llama-3.2-3B teacher and Llama-3.2-1B student shapes, random weights.
GPU_SHAPES = {
    "teacher": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                    num_key_value_heads=8, vocab_size=128256, head_dim=128),
    "student": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, head_dim=64),
    "batch": 4, "seq": 1024, "steps": 8, "warmup": 3, "gen_batch": 32, "gen_new": 128, "prompt_len": 32,
}


def make_model(shape, out, dtype):
    cfg = AutoConfig.for_model("llama", max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=0,
                               eos_token_id=1, pad_token_id=2, rope_theta=500000.0, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(out)
    # A tokenizer of the right size is needed by our stages (text prompts).
    fast = tiny.build_tokenizer(out, vocab_size=300)
    del fast
    return out


class PeakGpuMemory:
    """Samples the GPU's used memory while a process runs (nvidia-smi)."""

    def __init__(self):
        self.peak, self.stop = 0, False
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop:
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True).stdout
                self.peak = max(self.peak, int(out.split()[0]) * 1024 * 1024)
            except Exception:
                pass
            time.sleep(0.05)


def run_measured(cmd, gpu=False):
    """As run(), with the child's max RSS from wait4 (Popen.communicate reaps it first)."""
    sampler = PeakGpuMemory() if gpu else None
    if sampler:
        sampler.thread.start()
    pid = os.fork()
    if pid == 0:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 2)
        out = os.open(cmd_out_path(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.execv(str(cmd[0]), [str(c) for c in cmd])
    _, status, usage = os.wait4(pid, 0)
    if sampler:
        sampler.stop = True
        sampler.thread.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed with {status}: {' '.join(map(str, cmd))}")
    return Path(cmd_out_path()).read_text(), usage.ru_maxrss * 1024, (sampler.peak if sampler else None)


_OUT = tempfile.mktemp(prefix="bench-out-")


def cmd_out_path():
    return _OUT


def fixed_length_data(path, vocab, n, seq):
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for i in range(n):
            ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
            f.write(json.dumps({"id": f"r{i}", "prompt_ids": ids[:1], "completion_ids": ids[1:]}) + "\n")
    return path


def bench(shapes, device, bf16, workdir):
    w = Path(workdir)
    dtype = torch.bfloat16 if bf16 else torch.float32
    teacher = make_model(shapes["teacher"], w / "teacher", dtype)
    student = make_model(shapes["student"], w / "student", torch.float32)
    b, seq, steps, warm = shapes["batch"], shapes["seq"], shapes["steps"], shapes["warmup"]
    vocab = shapes["teacher"]["vocab_size"]
    data = fixed_length_data(w / "data.jsonl", vocab, b * steps, seq)
    py = sys.executable
    ref = [py, ROOT / "scripts" / "bench_reference.py"]
    gpu = device.startswith("cuda")
    flag_bf16 = ["--bf16"] if bf16 else []
    rows = []

    # Distillation step: teacher forward, student forward + backward, AdamW step.
    out = w / "distill"
    _, rss, gmem = run_measured([BIN / "kd-distill", "--teacher", teacher, "--student", student, "--data", data,
                                 "--out", out, "--steps", steps, "--batch-size", b, "--seq-len", seq, "--warmup", 0,
                                 "--device", device, "--dtype", "bf16" if bf16 else "f32", "--lr", 1e-4], gpu)
    secs = [float(r["seconds"]) for r in csv.DictReader(open(out / "metrics.csv"))]
    ours_step = (secs[-1] - secs[warm - 1]) / (len(secs) - warm)
    o, ref_rss, ref_gmem = run_measured(ref + ["distill", "--teacher", teacher, "--student", student, "--batch", b,
                                               "--seq", seq, "--steps", steps, "--warmup", warm, "--device", device] + flag_bf16, gpu)
    theirs = json.loads(o.strip().splitlines()[-1])
    rows.append(("distillation step", ours_step, theirs["step_seconds"], b * seq / ours_step,
                 theirs["tokens_per_second"], rss, ref_rss, gmem, ref_gmem))

    # Teacher generation (greedy, fixed length).
    prompts = w / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(shapes["gen_batch"]):
            f.write(json.dumps({"id": f"p{i}", "prompt": "In the beginning God created the heaven " * 3}) + "\n")
    gen_out = w / "gen.jsonl"
    o, rss, gmem = run_measured([BIN / "kd-generate", "--teacher", teacher, "--prompts", prompts, "--out", gen_out,
                                 "--max-new-tokens", shapes["gen_new"], "--batch-size", shapes["gen_batch"],
                                 "--ignore-eos", "--device", device, "--dtype", "bf16" if bf16 else "f32"], gpu)
    ours_tps = float(o.split("tokens/s")[0].split("(")[-1])
    o, ref_rss, ref_gmem = run_measured(ref + ["generate", "--teacher", teacher, "--batch", shapes["gen_batch"],
                                               "--prompt-len", shapes["prompt_len"], "--new", shapes["gen_new"],
                                               "--device", device] + flag_bf16, gpu)
    theirs = json.loads(o.strip().splitlines()[-1])
    rows.append((f"generation (batch {shapes['gen_batch']})", None, None, ours_tps, theirs["tokens_per_second"], rss,
                 ref_rss, gmem, ref_gmem))

    # Evaluation (perplexity over fixed-length sequences).
    metrics = w / "eval.json"
    _, rss, gmem = run_measured([BIN / "kd-eval", "--model", teacher, "--data", data, "--out", metrics, "--batch-size", b,
                                 "--device", device, "--dtype", "bf16" if bf16 else "f32"], gpu)
    m = json.loads(metrics.read_text())
    o, ref_rss, ref_gmem = run_measured(ref + ["eval", "--teacher", teacher, "--batch", b, "--seq", seq,
                                               "--batches", steps, "--device", device] + flag_bf16, gpu)
    theirs = json.loads(o.strip().splitlines()[-1])
    rows.append(("evaluation (perplexity)", None, None, m["perplexity_tokens_per_second"], theirs["tokens_per_second"],
                 rss, ref_rss, gmem, ref_gmem))
    return rows


def vocab_memory(workdir, device):
    """Peak RSS of one distillation step against vocabulary size (chunked logits)."""
    out = []
    for vocab in [32000, 128256, 151936]:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=vocab)
        w = Path(workdir) / f"v{vocab}"
        w.mkdir()
        t = make_model(shape, w / "teacher", torch.float32)
        s = make_model(shape, w / "student", torch.float32)
        data = fixed_length_data(w / "data.jsonl", vocab, 8, 512)
        _, rss, _ = run_measured([BIN / "kd-distill", "--teacher", t, "--student", s, "--data", data, "--out",
                                  w / "out", "--steps", 2, "--batch-size", 8, "--seq-len", 512, "--device", device])
        o, ref_rss, _ = run_measured([sys.executable, ROOT / "scripts" / "bench_reference.py", "distill", "--teacher", t,
                                      "--student", s, "--batch", 8, "--seq", 512, "--steps", 2, "--warmup", 0,
                                      "--device", device])
        weights = 2 * 2 * vocab * 64 * 4  # embeddings + heads of both models, fp32 (tied: counted once each)
        out.append((vocab, rss, ref_rss, weights))
    return out


def mib(x):
    return "–" if x is None else f"{x / 2**20:.0f} MiB"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--no-vocab", action="store_true")
    a = p.parse_args()
    device = "cuda" if a.gpu else "cpu"
    shapes = GPU_SHAPES if a.gpu else CPU_SHAPES
    cpu = platform.processor() or platform.machine()
    with tempfile.TemporaryDirectory() as work:
        rows = bench(shapes, device, a.gpu, work)
        vocab = [] if (a.no_vocab or a.gpu) else vocab_memory(work, device)
    where = torch.cuda.get_device_name(0) if a.gpu else f"CPU ({os.cpu_count()} cores, {cpu})"
    t, s = shapes["teacher"], shapes["student"]
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `make bench` (`python scripts/bench.py`) on {where}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Distillery and the PyTorch eager reference "
        "(`scripts/bench_reference.py`: transformers models, the same KD loss, torch AdamW) run the same shapes in one run.",
        "",
        f"Teacher: Llama, hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, vocabulary {t['vocab_size']}. "
        f"Student: hidden {s['hidden_size']}, {s['num_hidden_layers']} layers. Batch {shapes['batch']}, "
        f"sequence {shapes['seq']}, {'bf16 autocast' if a.gpu else 'fp32'}.",
        "",
        "| workload | Distillery tokens/s | PyTorch tokens/s | speed ratio | Distillery peak memory | PyTorch peak memory | memory ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, _, _, ours, theirs, rss, ref_rss, g, rg in rows:
        mem, rmem = (g, rg) if a.gpu else (rss, ref_rss)
        lines.append(f"| {name} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}x | {mib(mem)} | {mib(rmem)} | "
                     f"{mem / rmem:.2f}x |")
    if vocab:
        lines += ["", "## Loss memory against vocabulary size", "",
                  "One distillation step, batch 8, sequence 512, hidden 64 (so the vocabulary dominates). Distillery "
                  "computes logit losses in chunks of at most 4M elements on CPU (16 MiB fp32) per [rows, vocab] tensor; the reference materialises full fp32 "
                  "`[batch, seq, vocab]` logits of both models.", "",
                  "| vocabulary | Distillery peak RSS | PyTorch peak RSS | ratio | fp32 [8, 512, vocab] tensor |",
                  "|---:|---:|---:|---:|---:|"]
        for v, rss, ref_rss, _ in vocab:
            lines.append(f"| {v} | {mib(rss)} | {mib(ref_rss)} | {rss / ref_rss:.2f}x | {mib(8 * 511 * v * 4)} |")
    if not a.gpu:
        lines += ["", "## GPU case", "",
                  "`python scripts/bench.py --gpu --out docs/BENCHMARKS-gpu.md` runs the same comparison with a "
                  "Llama-3.2-3B-shaped teacher and a Llama-3.2-1B-shaped student (random weights, bf16 autocast, "
                  "sequence 1024, vocabulary 128256) and generation at batch 32, sampling GPU memory with nvidia-smi. "
                  "No session so far has had a GPU, so it has not been run: no GPU figure is claimed."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
