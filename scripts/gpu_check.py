"""Every GPU check in one call, for a session that is lent a GPU (../shared/GPU.md):

    KD_BIN=.gpu/bin python3 scripts/gpu_check.py --out $OUT        # on the GPU machine
    python scripts/gpu_check.py --device cpu --no-bench --out /tmp/x  # dry run here
    make gpu-bin                                                      # fills .gpu/bin to carry

1. Perplexity parity on the device: kd-eval against transformers, both on the device, fp32,
   tiny random checkpoints of every architecture (tolerance 1e-4 relative, as on CPU), and
   the bf16 figures side by side (reported, not asserted).
2. bf16 and f16 first-step gradients against fp32 at vocabulary 128256 (the test binary of
   crates/distillery/tests/mixed_precision.rs, carried as BIN/mixed_precision): cosine above
   0.99 and norms within 5% for the head, a middle layer, an attention projection and the
   hidden-state projection, and no head-gradient entry lost to underflow.
   The same binary checks that a step with activation checkpointing gives the plain step's
   gradients (fp32 and bf16) on the device, and reports which GEMM a bf16 head's own gradient
   ran as (on CUDA one bf16 GEMM accumulating into fp32, `addmm.dtype_out`, where its probe
   passes; else an fp32 GEMM).
3. A bf16 kd-distill run on the device (tiny teacher and student, hidden and attention
   matching on): the losses must stay finite; the same run with --gradient-checkpointing must
   give the same losses (within 1% relative: bf16 sums the residual gradient in another order).
4. `scripts/bench.py --gpu` (Llama-3.2 1B/3B shapes), written to OUT/BENCHMARKS-gpu.md.

OUT/gpu-check.md is rewritten after every check, so a run cut short keeps what finished;
exits 1 if a check fails.
"""
import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import reference  # noqa: E402
import tiny  # noqa: E402

BIN = Path(os.environ["KD_BIN"]) if os.environ.get("KD_BIN") else ROOT / "target" / "release"
TEXTS = [
    "Knowledge distillation trains a small student to imitate a large teacher.",
    "The teacher's soft targets carry more information per example than hard labels.",
    "In the beginning God created the heaven and the earth.",
    "A pruned student starts closer to the teacher than a random one.",
]


def mixed_precision_binary():
    """The mixed-precision test binary: the carried one (BIN/mixed_precision), else the newest
    one cargo built here (older builds stay in deps/); None where there is none."""
    built = [b for b in (ROOT / "target" / "release" / "deps").glob("mixed_precision-*") if not b.suffix]
    return next((b for b in [BIN / "mixed_precision", *sorted(built, key=lambda b: b.stat().st_mtime, reverse=True)]
                 if b.is_file() and os.access(b, os.X_OK)), None)


def run(*cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}\n{p.stderr[-2000:]}")
    return p.stdout


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-bench", action="store_true")
    a = p.parse_args()
    out = Path(a.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "texts.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    where = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "CPU (dry run)"
    lines = [f"# GPU checks on {where}", "", f"torch {torch.__version__}; `scripts/gpu_check.py`.", "",
             "## Perplexity: kd-eval against transformers on the same device", "",
             "| architecture | dtype | Distillery | transformers | relative difference | within 1e-4 |",
             "|---|---|---:|---:|---:|---|"]
    failed = []
    report = out / "gpu-check.md"

    def flush():
        report.write_text("\n".join(lines) + "\n")

    dtypes = [("f32", torch.float32), ("bf16", torch.bfloat16)]
    for arch in tiny.ARCHS:
        model = tiny.make_model(arch, work / arch)
        for name, dtype in dtypes:
            metrics = work / f"{arch}-{name}.json"
            run(BIN / "kd-eval", "--model", model, "--data", data, "--out", metrics, "--batch-size", 2,
                "--device", a.device, "--dtype", name)
            ours = json.loads(metrics.read_text())["perplexity"]
            theirs = reference.perplexity(model, TEXTS, a.device, dtype)
            rel = abs(ours - theirs) / theirs
            ok = rel < 1e-4 if name == "f32" else None
            if ok is False:
                failed.append(f"{arch} {name} perplexity differs by {rel:.2e}")
            lines.append(f"| {arch} | {name} | {ours:.6f} | {theirs:.6f} | {rel:.2e} | "
                         f"{'yes' if ok else ('no' if ok is False else 'not asserted')} |")
            flush()

    # Reduced-precision gradients against fp32 at Llama 3's vocabulary.
    probe = mixed_precision_binary()
    lines += ["", "## First-step gradients, bf16 and f16 against fp32 (vocabulary 128256 on a GPU)", ""]
    if probe is None:
        failed.append("the mixed_precision test binary is missing (make gpu-bin)")
        lines.append("Not run: no mixed_precision test binary.")
    else:
        vocab = "128256" if a.device.startswith("cuda") else "32768"
        env = {**os.environ, "DISTILLERY_MP_DEVICE": a.device, "DISTILLERY_MP_VOCAB": vocab}
        g = subprocess.run([str(probe), "--nocapture", "--test-threads", "1"], capture_output=True, text=True, env=env)
        found = [l for l in g.stderr.splitlines() if l.startswith("gradient ")]
        lines += [f"Vocabulary {vocab} on {a.device}:", ""] + [f"* {l[len('gradient '):]}" for l in found]
        if g.returncode != 0:
            failed.append("reduced-precision gradients disagree with fp32")
            lines += ["", "```", g.stderr[-1500:], "```"]
    flush()

    # Distillation with every loss term on, in bf16 autocast where the device allows it.
    teacher, student = work / "llama", work / "student"
    run(BIN / "kd-init", "--teacher", teacher, "--out", student, "--layers", 1, "--init", "copy-layers",
        "--device", a.device)
    records = work / "train.jsonl"
    records.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS * 4)))
    dtype = "bf16"
    run(BIN / "kd-distill", "--teacher", teacher, "--student", student, "--data", records, "--out", work / "distilled",
        "--steps", 10, "--batch-size", 4, "--hidden-weight", 0.5, "--attn-weight", 0.2, "--device", a.device,
        "--dtype", dtype)
    rows = list(csv.DictReader(open(work / "distilled" / "metrics.csv")))
    finite = all(math.isfinite(float(r["loss"])) for r in rows)
    if not finite:
        failed.append("kd-distill loss not finite")
    lines += ["", f"## kd-distill, {dtype}, {len(rows)} steps with CE, KD, hidden and attention terms", "",
              f"First loss {float(rows[0]['loss']):.4f}, last {float(rows[-1]['loss']):.4f}; all finite: "
              f"{'yes' if finite else 'NO'}."]
    flush()
    run(BIN / "kd-distill", "--teacher", teacher, "--student", student, "--data", records, "--out", work / "checkpointed",
        "--steps", 10, "--batch-size", 4, "--hidden-weight", 0.5, "--attn-weight", 0.2, "--device", a.device,
        "--dtype", dtype, "--gradient-checkpointing")
    ckpt = list(csv.DictReader(open(work / "checkpointed" / "metrics.csv")))
    worst = max((abs(float(c["loss"]) - float(r["loss"])) / max(abs(float(r["loss"])), 1e-9) for r, c in zip(rows, ckpt)),
                default=math.inf)
    same = len(ckpt) == len(rows) and worst < 1e-2
    if not same:
        failed.append("kd-distill with --gradient-checkpointing departs from the plain run")
    lines += ["", f"With --gradient-checkpointing: {len(ckpt)} steps logged; largest relative loss difference from "
              f"the plain run {worst:.2e} ({'ok' if same else 'TOO LARGE or missing'})."]
    flush()

    if not a.no_bench:
        bench_out = out / "BENCHMARKS-gpu.md"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--gpu", "--repeats", "1", "--no-compile",
                        "--out", str(bench_out)], check=True, env={**os.environ, "KD_BIN": str(BIN)})
        lines += ["", f"Benchmarks: {bench_out.name}."]
    lines += ["", "Failed: " + "; ".join(failed) if failed else "All checks passed."]
    flush()
    print("\n".join(lines))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
