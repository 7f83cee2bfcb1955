"""Reproduces the tables of docs/RESULTS.md on the demo teacher (about 20 minutes on 2 CPU cores):

    make build && .venv/bin/python scripts/experiments.py --out docs/RESULTS-tables.md

Every variant starts from the same student (the demo teacher pruned 4x, or a random student
of the same shape), sees the same data in the same order for the same number of steps, and
is evaluated on the same held-out passages and multiple-choice items.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# DISTILLERY_BIN: binaries copied aside, so that a rebuild cannot change a long study under way.
BIN = Path(os.environ.get("DISTILLERY_BIN") or ROOT / "target" / "release")
TEACHER = ROOT / "data" / "demo-teacher"
SHAPE = ["--layers", "2", "--hidden", "128", "--heads", "2", "--kv-heads", "1", "--intermediate", "352"]


def sh(*cmd):
    cmd = [str(c) for c in cmd]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr)
    return p.stdout


def unpack(name, out, n=None, every=1):
    with gzip.open(ROOT / "data" / "kjv" / f"{name}.jsonl.gz", "rt") as f, open(out, "w") as g:
        lines = [l for i, l in enumerate(f) if i % every == 0]
        g.writelines(lines[:n] if n else lines)
    return out


def evaluate(model, work, name, heldout, mc):
    out = work / f"{name}.json"
    sh(BIN / "kd-eval", "--model", model, "--teacher", TEACHER, "--data", heldout, "--mc", mc, "--limit", 400,
       "--out", out, "--name", name, "--device", "cpu")
    return json.loads(out.read_text())


def row(name, m):
    return (f"| {name} | {m['perplexity']:.2f} | {m['teacher_kl']:.4f} | {100 * m['top1_agreement']:.1f}% | "
            f"{100 * m['mc_accuracy']:.1f}% |")


HEADER = ["| variant | held-out perplexity | KL(teacher ‖ student) | top-1 agreement | multiple choice |",
          "|---|---:|---:|---:|---:|"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=str(ROOT / "runs" / "experiments"))
    p.add_argument("--out", default=str(ROOT / "docs" / "RESULTS-tables.md"))
    p.add_argument("--steps", type=int, default=400)
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    train = unpack("train", work / "train.jsonl", n=2000)
    heldout = unpack("heldout", work / "heldout.jsonl")
    mc = unpack("eval_mc", work / "mc.jsonl")
    calib = unpack("train", work / "calib.jsonl", n=64)
    prompts = unpack("prompts", work / "prompts.jsonl", n=512, every=7)
    common = ["--steps", a.steps, "--batch-size", 16, "--seq-len", 160, "--lr", "2e-3", "--warmup", 20, "--seed", 0,
              "--device", "cpu"]
    lines = [f"Commands: `scripts/experiments.py` (steps {a.steps}, batch 16, sequence 160, lr 2e-3, "
             "seed 0, CPU fp32). Student: 2 layers, hidden 128, 2 heads / 1 KV head, FFN 352 "
             "(0.9M parameters against the teacher's 4.0M).", ""]
    cached = work / "teacher.json"
    teacher_m = json.loads(cached.read_text()) if cached.exists() else evaluate(TEACHER, work, "teacher", heldout, mc)
    lines += ["Teacher: " + row("teacher", teacher_m).strip("| ").replace(" | ", ", "), ""]

    for init in ["prune", "random"]:
        student = work / f"init-{init}"
        if not (student / "model.safetensors").exists():
            extra = ["--calib", calib] if init == "prune" else []
            sh(BIN / "kd-init", "--teacher", TEACHER, "--out", student, "--init", init, *SHAPE, *extra, "--device", "cpu")
        kd = ["--alpha", 0.5, "--beta", 0.5, "--temperature", 2]
        variants = {
            "ce": ("CE only (alpha=1, beta=0)", ["--alpha", 1, "--beta", 0]),
            "kd": ("KD logits (alpha=0.5, beta=0.5, T=2)", kd),
            "kd-t1": ("KD logits only (alpha=0, beta=1, T=1)", ["--alpha", 0, "--beta", 1, "--temperature", 1]),
            "hid-mse1": ("KD + hidden MSE, gamma_h=1", kd + ["--hidden-weight", 1]),
            "hid-mse0.001": ("KD + hidden MSE, gamma_h=0.001", kd + ["--hidden-weight", 0.001]),
            "hid-nmse": ("KD + hidden normalised MSE, gamma_h=1", kd + ["--hidden-weight", 1, "--hidden-metric",
                                                                      "normalized-mse"]),
            "hid-cos": ("KD + hidden cosine, gamma_h=1", kd + ["--hidden-weight", 1, "--hidden-metric", "cosine"]),
            "attn": ("KD + attention KL, gamma_a=1", kd + ["--attn-weight", 1]),
            "prog-mse": ("progressive, hidden MSE gamma_h=1 (2 x 50 steps), then KD + hidden", kd + [
                "--hidden-weight", 1, "--schedule", "progressive", "--phase-steps", 50]),
            "prog-cos": ("progressive, hidden cosine gamma_h=1 (2 x 50 steps), then KD + hidden", kd + [
                "--hidden-weight", 1, "--hidden-metric", "cosine", "--schedule", "progressive", "--phase-steps", 50]),
        }
        lines += [f"### Student initialised by {'pruning the teacher' if init == 'prune' else 'random init'}", ""]
        lines += HEADER
        cached = work / f"{init}-before.json"
        before = json.loads(cached.read_text()) if cached.exists() else evaluate(student, work, f"{init}-before", heldout, mc)
        lines.append(row("before training", before))
        for slug, (name, flags) in variants.items():
            out = work / f"{init}-{slug}"
            if not (out / "model.safetensors").exists() or not (out / "train_state").exists():
                sh(BIN / "kd-distill", "--teacher", TEACHER, "--student", student, "--data", train, "--out", out,
                   *flags, *common, "--resume")
            result = work / f"{init}-{slug}.json"
            m = json.loads(result.read_text()) if result.exists() else evaluate(out, work, f"{init}-{slug}", heldout, mc)
            lines.append(row(name, m))
        lines.append("")

    # Offline top-32 logits against the live teacher on the same transfer set.
    transfer = work / "transfer.jsonl"
    if not transfer.exists():
        sh(BIN / "kd-generate", "--teacher", TEACHER, "--prompts", prompts, "--out", transfer, "--max-new-tokens", 48,
           "--temperature", 1.0, "--seed", 0, "--store-logits", 32, "--batch-size", 32, "--device", "cpu")
    student = work / "init-prune"
    lines += ["### Offline (stored top-32 logits) against online distillation", "",
              "Transfer set: 512 teacher completions (48 tokens, T=1) of corpus openings; KD only "
              "(alpha=0, beta=1, T=1) on it, from the pruned student.", ""] + HEADER
    for name, extra in [("online (live teacher)", []), ("offline (top-32 + tail)", ["--teacher-logits",
                                                                                     str(transfer) + ".logits.safetensors"])]:
        out = work / f"offline-{len(extra)}"
        if not (out / "model.safetensors").exists() or not (out / "train_state").exists():
            sh(BIN / "kd-distill", "--teacher", TEACHER, "--student", student, "--data", transfer, "--out", out,
               "--alpha", 0, "--beta", 1, "--temperature", 1, *extra, *common, "--resume")
        cached = work / f"offline-{len(extra)}.json"
        m = json.loads(cached.read_text()) if cached.exists() else evaluate(out, work, f"offline-{len(extra)}", heldout, mc)
        lines.append(row(name, m))
    text = "\n".join(lines) + "\n"
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
