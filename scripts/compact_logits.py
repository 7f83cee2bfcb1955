"""Offline KD from the compact top-K sidecar against the safetensors one and against the
live teacher, on the demo teacher (docs/RESULTS.md, "Compact offline logits"):

    make build && .venv/bin/python scripts/compact_logits.py --steps 300

One transfer set (teacher completions of corpus openings, T=1, seed 0) is generated twice
with --store-logits K, once per sidecar format (the completions are the same: the sampling is
seeded per record); the pruned student of scripts/experiments.py is distilled on it with KD
only (alpha 0, beta 1, T 1) from the live teacher and from each sidecar, the same steps,
data order and seed, and each result is evaluated on the same held-out passages.
"""
import argparse
import json
from pathlib import Path

from experiments import BIN, ROOT, SHAPE, TEACHER, sh, unpack


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=str(ROOT / "runs" / "compact-logits"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--heldout", type=int, default=400)
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    prompts = unpack("prompts", work / "prompts.jsonl", n=a.prompts, every=7)
    heldout = unpack("heldout", work / "heldout.jsonl", n=a.heldout)
    calib = unpack("train", work / "calib.jsonl", n=64)
    student = work / "init-prune"
    if not (student / "model.safetensors").exists():
        sh(BIN / "kd-init", "--teacher", TEACHER, "--out", student, "--init", "prune", *SHAPE, "--calib", calib,
           "--device", "cpu")
    sidecars, summaries = {}, {}
    for fmt in ["safetensors", "compact"]:
        out = work / f"transfer-{fmt}.jsonl"
        if not out.exists():
            sh(BIN / "kd-generate", "--teacher", TEACHER, "--prompts", prompts, "--out", out, "--max-new-tokens", 48,
               "--temperature", 1.0, "--seed", 0, "--store-logits", a.k, "--logits-format", fmt, "--batch-size", 32,
               "--device", "cpu")
        summaries[fmt] = json.loads(Path(f"{out}.summary.json").read_text())
        sidecars[fmt] = (out, work / summaries[fmt]["logits"]["file"])
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k != "teacher_logits"} for l in open(path)]
    assert strip(sidecars["safetensors"][0]) == strip(sidecars["compact"][0]), "the two transfer sets differ"
    common = ["--steps", a.steps, "--batch-size", 16, "--seq-len", 160, "--lr", "2e-3", "--warmup", 20, "--seed", 0,
              "--alpha", 0, "--beta", 1, "--temperature", 1, "--device", "cpu"]
    runs = {
        "online (live teacher)": (sidecars["safetensors"][0], []),
        f"offline, safetensors top-{a.k}": (sidecars["safetensors"][0], ["--teacher-logits", sidecars["safetensors"][1]]),
        f"offline, compact top-{a.k}": (sidecars["compact"][0], ["--teacher-logits", sidecars["compact"][1]]),
    }
    rows = []
    for i, (name, (data, extra)) in enumerate(runs.items()):
        out = work / f"run-{i}"
        if not (out / "model.safetensors").exists():
            sh(BIN / "kd-distill", "--teacher", TEACHER, "--student", student, "--data", data, "--out", out, *extra,
               *common)
        m = work / f"run-{i}.json"
        if not m.exists():
            sh(BIN / "kd-eval", "--model", out, "--teacher", TEACHER, "--data", heldout, "--out", m, "--device", "cpu")
        rows.append((name, json.loads(m.read_text())))
    base = rows[1][1]["teacher_kl"]
    lines = [f"Transfer set: {summaries['compact']['outputs']} completions, {summaries['compact']['tokens']} tokens; "
             f"sidecars at top-{a.k}: safetensors {summaries['safetensors']['logits']['bytes_per_token']:.1f} bytes per "
             f"stored token, compact {summaries['compact']['logits']['bytes_per_token']:.1f}. {a.steps} steps, batch 16, "
             f"KD only (alpha 0, beta 1, T 1), seed 0; held-out: the first {a.heldout} KJV held-out passages.", "",
             "| variant | held-out perplexity | KL(teacher ‖ student) | KL against offline safetensors | top-1 agreement |",
             "|---|---:|---:|---:|---:|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['perplexity']:.2f} | {m['teacher_kl']:.4f} | "
                     f"{100 * (m['teacher_kl'] - base) / base:+.2f}% | {100 * m['top1_agreement']:.1f}% |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
