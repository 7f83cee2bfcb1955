"""Where a pruned SmolLM2 student's quality goes, and which start the real-teacher pipeline
should use (docs/RESULTS.md, "Pruning a real teacher").

    make teacher PIPELINE=pipelines/smollm2.mk     # the teacher directory, runs/smollm2/teacher
    python scripts/prune_study.py [--steps 40]     # about 30 minutes on 2 CPU cores

Part A, one-shot (no training): each axis alone, all four at once, and four students of the
same size (about a third of the teacher's non-embedding parameters) that trade depth for
width differently. Part B: the calibration set's size. Part D: the same cuts chosen at
random (kd-init --random-importance), which says what the importance estimate buys. Part C: each equal-size start
distilled for --steps steps on the pipeline's transfer set (the same data, seed and steps),
and an iterative start (prune half way, distil half the steps, prune again, distil the rest)
against one-shot. Perplexity on 20 held-out KJV passages (one-shot) and on the held-out
teacher answers (after distillation), with bootstrap intervals from kd-eval.
Writes runs/prune-study/results.json and prints a markdown table.
"""
import argparse
import gzip
import json
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"


def run(*args):
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def non_embedding(model, total):
    """Parameters outside the token embeddings (and the output head when it is not tied)."""
    c = json.loads((Path(model) / "config.json").read_text())
    return total - c["vocab_size"] * c["hidden_size"] * (1 if c.get("tie_word_embeddings", True) else 2)


def perplexity(model, data, out):
    if not Path(out).exists():  # a rerun adds what is missing and reuses the rest
        run(BIN / "kd-eval", "--model", model, "--data", data, "--out", out, "--device", "cpu")
    m = json.loads(Path(out).read_text())
    return m["perplexity"], m["perplexity_ci95"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="runs/smollm2/teacher")
    ap.add_argument("--transfer", default="runs/smollm2/filtered.jsonl", help="the pipeline's filtered transfer set")
    ap.add_argument("--heldout", default="runs/smollm2/data/heldout_ids.jsonl", help="held-out teacher answers")
    ap.add_argument("--out", default="runs/prune-study")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip-training", action="store_true")
    a = ap.parse_args()
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    kjv = out / "kjv20.jsonl"
    with gzip.open(ROOT / "data" / "kjv" / "heldout.jsonl.gz", "rt") as f:
        kjv.write_text("".join(f.readlines()[:20]))
    calib = {}
    with gzip.open(ROOT / "data" / "kjv" / "train.jsonl.gz", "rt") as f:
        lines = f.readlines()
    for n in (8, 64, 256):
        calib[n] = out / f"calib{n}.jsonl"
        calib[n].write_text("".join(lines[:n]))
    results = {"teacher": {"kjv": perplexity(a.teacher, kjv, out / "teacher-kjv.json")}}

    def prune(name, shape, n_calib=64, teacher=a.teacher, extra=()):
        d = out / name
        if not (d / "model.safetensors").exists():
            run(BIN / "kd-init", "--teacher", teacher, "--out", d, "--init", "prune", *shape.split(), "--calib", calib[n_calib],
                "--calib-limit", n_calib, "--device", "cpu", *extra)
        total = json.loads((d / "distillery_init.json").read_text())["student_params"]
        r = {"shape": shape, "calib": n_calib, "non_embedding_params": non_embedding(d, total), "params": total,
             "kjv": perplexity(d, kjv, out / f"{name}-kjv.json")}
        results[name] = r
        print(name, r, flush=True)
        return d

    t0 = time.time()
    # A: one axis at a time, all at once, and equal-size trades of depth for width.
    prune("depth-20", "--layers 20")
    prune("hidden-480", "--hidden 480")
    prune("ffn-1024", "--intermediate 1024")
    prune("heads-6", "--heads 6 --kv-heads 2")
    # Six heads in three kv groups: one query head of each group of three goes.
    prune("heads-6-kv3", "--heads 6 --kv-heads 3")
    prune("all-four", "--layers 10 --hidden 384 --heads 6 --kv-heads 2 --intermediate 1024")
    equal = {
        "depth+ffn (12L, FFN 1024)": "--layers 12 --intermediate 1024",
        "depth+ffn (16L, FFN 640)": "--layers 16 --intermediate 640",
        "width (30L, hidden 384, 6 heads, FFN 576)": "--hidden 384 --heads 6 --kv-heads 2 --intermediate 576",
        "width (30L, 6 heads, FFN 256)": "--heads 6 --kv-heads 2 --intermediate 256",
    }
    names = {}
    for label, shape in equal.items():
        names[label] = prune("eq-" + label.split(" (")[0].replace("+", "-") + "-" + shape.replace("--", "").replace(" ", ""), shape)
    # B: calibration size, on the pipeline's shape.
    for n in (8, 256):
        prune(f"calib-{n}", equal["depth+ffn (12L, FFN 1024)"], n_calib=n)
    # D: what the importance estimate is worth: the same shapes pruned by chance (seeded).
    for seed in (0, 1):
        prune(f"heads-6-random-s{seed}", "--heads 6 --kv-heads 2", extra=("--random-importance", "--seed", seed))
        prune(f"heads-6-kv3-random-s{seed}", "--heads 6 --kv-heads 3", extra=("--random-importance", "--seed", seed))
    prune("ffn-1024-random-s0", "--intermediate 1024", extra=("--random-importance", "--seed", 0))
    prune("depth-20-random-s0", "--layers 20", extra=("--random-importance", "--seed", 0))
    prune("eq-12L-random-s0", equal["depth+ffn (12L, FFN 1024)"], extra=("--random-importance", "--seed", 0))
    results["one_shot_seconds"] = time.time() - t0

    if not a.skip_training:
        # C: each equal-size start distilled the same way; then iterative against one-shot.
        def distil(name, student, steps, teacher=a.teacher):
            d = out / f"kd-{name}"
            if not (d / "model.safetensors").exists():
                run(BIN / "kd-distill", "--teacher", teacher, "--student", student, "--out", d, "--data", ROOT / a.transfer,
                    "--steps", steps, "--batch-size", 4, "--seq-len", 256, "--lr", "5e-4", "--warmup", 5, "--alpha", 0.5,
                    "--beta", 0.5, "--seed", 0, "--device", "cpu")
            return d

        t1 = time.time()
        for label, d in names.items():
            kd = distil(d.name, d, a.steps)
            results.setdefault("distilled", {})[label] = perplexity(kd, ROOT / a.heldout, out / f"{kd.name}-heldout.json")
            print(label, results["distilled"][label], flush=True)
        # Iterative: half way (20 layers, FFN 1280), half the steps, then to the final shape.
        mid = prune("iter-mid", "--layers 20 --intermediate 1280")
        mid_kd = distil("iter-mid", mid, a.steps // 2)
        final = prune("iter-final", equal["depth+ffn (12L, FFN 1024)"], teacher=mid_kd)
        fin_kd = distil("iter-final", final, a.steps - a.steps // 2)
        results.setdefault("distilled", {})["iterative (20L/FFN 1280, then 12L/FFN 1024)"] = perplexity(
            fin_kd, ROOT / a.heldout, out / "iter-heldout.json")
        results["training_seconds"] = time.time() - t1
    (out / "results.json").write_text(json.dumps(results, indent=1))

    print("\n| start | shape | non-embedding params | KJV perplexity, one-shot |\n|---|---|---:|---:|")
    for k, v in results.items():
        if isinstance(v, dict) and "kjv" in v:
            ppl, (lo, hi) = v["kjv"]
            print(f"| {k} | `{v.get('shape', 'teacher')}` | {v.get('non_embedding_params') or '–'} | {ppl:.1f} [{lo:.1f}, {hi:.1f}] |")
    if "distilled" in results:
        print(f"\n| start, then {a.steps} steps of KD | held-out perplexity |\n|---|---:|")
        for k, (ppl, (lo, hi)) in results["distilled"].items():
            print(f"| {k} | {ppl:.2f} [{lo:.2f}, {hi:.2f}] |")


if __name__ == "__main__":
    main()
