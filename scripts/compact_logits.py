"""Offline KD from the compact top-K sidecar against the safetensors one and against the
live teacher (docs/RESULTS.md, "Compact offline logits"):

    make build && .venv/bin/python scripts/compact_logits.py --steps 300          # demo teacher
    .venv/bin/python scripts/compact_logits.py --real    # SmolLM2-135M-Instruct (its GGUF)

One transfer set (teacher completions of corpus openings, T=1, seed 0) is generated with
--store-logits K into the safetensors sidecar and converted to the compact one (`kd-logits
convert` writes what kd-generate would); the pruned student of scripts/experiments.py is distilled on it with KD
only (alpha 0, beta 1, T 1) from the live teacher and from each sidecar, the same steps,
data order and seed, and each result is evaluated on the same held-out passages.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from experiments import BIN, ROOT, SHAPE, TEACHER, sh, unpack

# SmolLM2 pruned to about a third of its non-embedding parameters, as pipelines/smollm2.mk does.
REAL_SHAPE = ["--layers", "16", "--intermediate", "640"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=str(ROOT / "runs" / "compact-logits"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--heldout", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", default="2e-3")
    p.add_argument("--shape", help="kd-init's shape flags for the student, e.g. '--layers 4 --intermediate 640'")
    p.add_argument("--no-online", action="store_true", help="only the two offline runs (the online one costs a "
                   "teacher forward every step)")
    p.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct from its GGUF as the teacher "
                   "(defaults then: 100 steps, 256 prompts, 100 held-out passages, batch 8, lr 5e-4)")
    a = p.parse_args()
    teacher, shape = TEACHER, SHAPE
    if a.real:
        gguf = subprocess.run([sys.executable, str(ROOT / "scripts" / "smollm2.py")], check=True, capture_output=True,
                              text=True).stdout.strip()
        defaults = {"work": str(ROOT / "runs" / "compact-logits-smollm2"), "steps": 100, "prompts": 256, "heldout": 100,
                    "batch_size": 8, "lr": "5e-4"}
        for key, value in defaults.items():
            if getattr(a, key) == p.get_default(key):
                setattr(a, key, value)
        teacher, shape = Path(a.work) / "teacher", REAL_SHAPE
        Path(a.work).mkdir(parents=True, exist_ok=True)
        if not (teacher / "model.safetensors").exists():
            sh(BIN / "kd-convert", "--model", gguf, "--out", teacher)
    if a.shape:
        shape = a.shape.split()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prompts = unpack("prompts", work / "prompts.jsonl", n=a.prompts, every=7)
    heldout = unpack("heldout", work / "heldout.jsonl", n=a.heldout)
    calib = unpack("train", work / "calib.jsonl", n=64)
    student = work / "init-prune"
    if not (student / "model.safetensors").exists():
        sh(BIN / "kd-init", "--teacher", teacher, "--out", student, "--init", "prune", *shape, "--calib", calib,
           "--device", "cpu")
    sidecars, summaries = {}, {}
    old, new = work / "transfer-safetensors.jsonl", work / "transfer-compact.jsonl"
    if not old.exists():
        sh(BIN / "kd-generate", "--teacher", teacher, "--prompts", prompts, "--out", old, "--max-new-tokens", 48,
           "--temperature", 1.0, "--seed", 0, "--store-logits", a.k, "--batch-size", 32, "--device", "cpu")
    if not new.exists():
        sh(BIN / "kd-logits", "convert", "--data", old, "--out", new, "--format", "compact")
    summary = json.loads(Path(f"{old}.summary.json").read_text())
    rows = summary["logits"]["rows"]
    for fmt, out in [("safetensors", old), ("compact", new)]:
        side = json.loads(open(out).readline())["teacher_logits"]["file"]
        sidecars[fmt] = (out, work / side)
        summaries[fmt] = {"outputs": summary["outputs"], "tokens": summary["tokens"],
                          "logits": {"bytes_per_token": (work / side).stat().st_size / rows}}
    common = ["--steps", a.steps, "--batch-size", a.batch_size, "--seq-len", 160, "--lr", a.lr, "--warmup", 20,
              "--seed", 0, "--alpha", 0, "--beta", 1, "--temperature", 1, "--device", "cpu"]
    runs = {
        "online (live teacher)": (sidecars["safetensors"][0], []),
        f"offline, safetensors top-{a.k}": (sidecars["safetensors"][0], ["--teacher-logits", sidecars["safetensors"][1]]),
        f"offline, compact top-{a.k}": (sidecars["compact"][0], ["--teacher-logits", sidecars["compact"][1]]),
    }
    if a.no_online:
        del runs["online (live teacher)"]
    rows = []
    for i, (name, (data, extra)) in enumerate(runs.items()):
        out = work / f"run-{i}"
        if not (out / "model.safetensors").exists():
            sh(BIN / "kd-distill", "--teacher", teacher, "--student", student, "--data", data, "--out", out, *extra,
               *common)
        m = work / f"run-{i}.json"
        if not m.exists():
            sh(BIN / "kd-eval", "--model", out, "--teacher", teacher, "--data", heldout, "--out", m, "--device", "cpu")
        rows.append((name, json.loads(m.read_text())))
    base = rows[-2][1]["teacher_kl"]
    lines = [f"Teacher: {'SmolLM2-135M-Instruct (Q4_1 GGUF)' if a.real else 'the demo teacher'}. Transfer set: {summaries['compact']['outputs']} completions, {summaries['compact']['tokens']} tokens; "
             f"sidecars at top-{a.k}: safetensors {summaries['safetensors']['logits']['bytes_per_token']:.1f} bytes per "
             f"stored token, compact {summaries['compact']['logits']['bytes_per_token']:.1f}. {a.steps} steps, batch {a.batch_size}, "
             f"KD only (alpha 0, beta 1, T 1), seed 0; student: kd-init --init prune {' '.join(shape)}; held-out: the first "
             f"{a.heldout} KJV held-out passages.", "",
             "| variant | held-out perplexity | KL(teacher ‖ student) | KL against offline safetensors | top-1 agreement |",
             "|---|---:|---:|---:|---:|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['perplexity']:.2f} | {m['teacher_kl']:.4f} | "
                     f"{100 * (m['teacher_kl'] - base) / base:+.2f}% | {100 * m['top1_agreement']:.1f}% |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
