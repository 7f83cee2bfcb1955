"""On-policy distillation step, split into its parts: Distillery's kd-distill --on-policy 1
against TRL-style eager PyTorch (scripts/bench_reference.py on-policy: transformers
`generate` for the student's samples, the teacher's forward, the generalized JSD and AdamW),
same shapes, same sampled length. Writes the "On-policy step" section of docs/BENCHMARKS.md
(part of `make bench`).

    python scripts/bench_on_policy.py [--out docs/BENCHMARKS.md] [--repeats 3]

Distillery's parts come from its metrics.csv: `sample_seconds` (the student's sampling),
`teacher_seconds` (the teacher's forward on the sampled sequences up to its last hidden
states), and the rest of the step (the student's forward and backward, the loss with the
teacher's output head computed chunk by chunk inside it, clipping and the update); the
reference's teacher part includes its output head. Medians over the
steps after warm-up, then over runs; the two sides alternate.
"""
import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402

SHAPES = {"batch": 8, "prompt_len": 16, "new": 64, "steps": 12, "warmup": 3}


def ours(teacher, student, work, s):
    w = Path(work)
    g = torch.Generator().manual_seed(1)
    vocab = bench.CPU_SHAPES["teacher"]["vocab_size"]
    data = w / "prompts.jsonl"
    with open(data, "w") as f:
        for i in range(s["batch"] * s["steps"]):
            f.write(json.dumps({"id": f"p{i}", "prompt_ids": torch.randint(3, vocab, (s["prompt_len"],), generator=g).tolist(),
                                "completion_ids": []}) + "\n")
    out = w / "op"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([str(bench.BIN / "kd-distill"), "--teacher", teacher, "--student", student, "--data", data, "--out", out,
                    "--on-policy", "1", "--divergence", "jsd", "--jsd-beta", "0.5", "--temperature", "1", "--alpha", "0",
                    "--beta", "1", "--gen-temperature", "1", "--gen-max-new-tokens", str(s["new"]), "--steps", str(s["steps"]),
                    "--batch-size", str(s["batch"]), "--seq-len", str(s["prompt_len"] + s["new"]), "--lr", "1e-4",
                    "--warmup", "0", "--device", "cpu"], check=True, capture_output=True)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    secs = [float(r["seconds"]) for r in rows]
    steps = [t1 - t0 for t0, t1 in zip(secs, secs[1:])][s["warmup"] - 1:]
    sample = [float(r["sample_seconds"]) for r in rows[s["warmup"]:]]
    teach = [float(r["teacher_seconds"]) for r in rows[s["warmup"]:]]
    tokens = statistics.mean(float(r["sampled_tokens"]) for r in rows)
    step = statistics.median(steps)
    parts = {"sample_seconds": statistics.median(sample), "teacher_seconds": statistics.median(teach)}
    parts["update_seconds"] = step - sum(parts.values())
    return {**parts, "step_seconds": step, "tokens_per_second": s["batch"] * tokens / step, "sampled_tokens": tokens}


def reference(teacher, student, s):
    o = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_reference.py"), "on-policy", "--teacher", str(teacher),
                        "--student", str(student), "--batch", str(s["batch"]), "--prompt-len", str(s["prompt_len"]),
                        "--new", str(s["new"]), "--steps", str(s["steps"]), "--warmup", str(s["warmup"])],
                       check=True, capture_output=True, text=True).stdout
    return {**json.loads(o.strip().splitlines()[-1]), "sampled_tokens": s["new"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    s = SHAPES
    runs = {"ours": [], "ref": []}
    with tempfile.TemporaryDirectory() as work:
        w = Path(work)
        teacher = bench.make_model(bench.CPU_SHAPES["teacher"], w / "teacher", torch.float32)
        student = bench.make_model(bench.CPU_SHAPES["student"], w / "student", torch.float32)
        for _ in range(a.repeats):
            runs["ours"].append(ours(teacher, student, work, s))
            runs["ref"].append(reference(teacher, student, s))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
    ratios = [o["tokens_per_second"] / r["tokens_per_second"] for o, r in zip(runs["ours"], runs["ref"])]
    where = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    t, st = bench.CPU_SHAPES["teacher"], bench.CPU_SHAPES["student"]
    lines = ["## On-policy step", "",
             f"`python scripts/bench_on_policy.py` (part of `make bench`) on {where}, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}: one on-policy step (GKD, lambda 1, JSD beta 0.5, temperature 1) with the "
             f"shapes above (teacher hidden {t['hidden_size']} x {t['num_hidden_layers']} layers, student hidden "
             f"{st['hidden_size']} x {st['num_hidden_layers']}, vocabulary {t['vocab_size']}), batch {s['batch']}, prompts of "
             f"{s['prompt_len']} tokens, {s['new']} sampled tokens per row, fp32. The reference is TRL's GKD step written "
             "eagerly (`scripts/bench_reference.py on-policy`: transformers `generate` with sampling, the teacher's "
             "forward, the generalized JSD, AdamW). Medians over steps after warm-up, then over "
             f"{a.repeats} alternating runs; the speed range is the lowest and highest ratio of back-to-back runs.", "",
             "| part of the step | Distillery | PyTorch eager (TRL-style) | ratio (PyTorch time / Distillery time) |",
             "|---|---:|---:|---:|"]
    for key, name in [("sample_seconds", "student samples the completions"), ("teacher_seconds", "teacher scores them (Distillery: without its output head)"),
                      ("update_seconds", "student forward, backward, update"), ("step_seconds", "whole step")]:
        o, r = med["ours"][key], med["ref"][key]
        lines.append(f"| {name} | {1000 * o:.0f} ms | {1000 * r:.0f} ms | {r / o:.2f}x |")
    lines += ["", f"Sampled tokens per second: Distillery {med['ours']['tokens_per_second']:.0f} (mean sampled length "
              f"{med['ours']['sampled_tokens']:.1f}: rows end at EOS), PyTorch {med['ref']['tokens_per_second']:.0f} "
              f"(exactly {s['new']}); speed ratio {med['ours']['tokens_per_second'] / med['ref']['tokens_per_second']:.2f}x "
              f"(range {min(ratios):.2f}–{max(ratios):.2f}x)."]
    text = "\n".join(lines) + "\n"
    print(text)
    bench.replace_section(a.out, "On-policy step", text)


if __name__ == "__main__":
    main()
