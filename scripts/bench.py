"""`make bench`: Distillery against the PyTorch reference (scripts/bench_reference.py) on
the same shapes, data sizes, batch and sequence length, in one run; writes the table with
ratios into docs/BENCHMARKS.md.

    python scripts/bench.py --out docs/BENCHMARKS.md            # CPU case (a few minutes)
    python scripts/bench.py --gpu --out docs/BENCHMARKS-gpu.md  # GPU case (Llama-3.2 1B/3B shapes)

Each side runs in its own process; peak memory is that process's max RSS (CPU) or, on a
GPU, the device memory in use sampled with nvidia-smi. Step time excludes start-up: it is
the median over steps after the warm-up ones. The two sides run in turn `--repeats` times
(3 on CPU, where a shared machine's speed drifts by a third from minute to minute) and the
table gives medians and the range of back-to-back ratios.
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
import threading
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
# KD_BIN: binaries copied elsewhere, e.g. .gpu/bin on the GPU machine (../shared/GPU.md).
BIN = Path(os.environ["KD_BIN"]) if os.environ.get("KD_BIN") else ROOT / "target" / "release"
sys.path.insert(0, str(ROOT / "tests"))
import tiny  # noqa: E402

CPU_SHAPES = {
    "teacher": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=8192),
    "student": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=8192),
    "batch": 8, "seq": 128, "steps": 30, "warmup": 5, "gen_batch": 8, "gen_new": 64, "prompt_len": 16, "repeats": 3,
}
# Llama-3.2-3B teacher and Llama-3.2-1B student shapes, random weights.
GPU_SHAPES = {
    "teacher": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                    num_key_value_heads=8, vocab_size=128256, head_dim=128),
    "student": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, head_dim=64),
    "batch": "largest", "batch_start": 4, "seq": 1024, "steps": 8, "warmup": 3, "gen_batch": 32, "gen_new": 128, "prompt_len": 32, "repeats": 1,
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
        err = os.open(cmd_out_path() + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(err, 2)
        out = os.open(cmd_out_path(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.execv(str(cmd[0]), [str(c) for c in cmd])
    _, status, usage = os.wait4(pid, 0)
    if sampler:
        sampler.stop = True
        sampler.thread.join()
    if os.waitstatus_to_exitcode(status) != 0:
        tail = Path(cmd_out_path() + ".err").read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{cmd[0]} failed with {status}: {' '.join(map(str, cmd))}\n" + "\n".join(tail))
    return Path(cmd_out_path()).read_text(), usage.ru_maxrss * 1024, (sampler.peak if sampler else None)


_OUT = tempfile.mktemp(prefix="bench-out-")


def cmd_out_path():
    return _OUT


def alternate(ours, theirs, repeats):
    """Runs the two sides in turn `repeats` times. Returns the median tokens/s of each, the
    smallest and largest ratio of a pair run back to back, and each side's largest peak
    memory (RSS, and GPU memory when sampled)."""
    pairs = [(ours(), theirs()) for _ in range(repeats)]
    med = lambda xs: statistics.median(xs)
    ratios = [o[0] / t[0] for o, t in pairs]
    peak = lambda xs: None if xs[0] is None else max(xs)
    return (med([o[0] for o, _ in pairs]), med([t[0] for _, t in pairs]), min(ratios), max(ratios),
            max(o[1] for o, _ in pairs), max(t[1] for _, t in pairs),
            peak([o[2] for o, _ in pairs]), peak([t[2] for _, t in pairs]))


def fixed_length_data(path, vocab, n, seq):
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for i in range(n):
            ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
            f.write(json.dumps({"id": f"r{i}", "prompt_ids": ids[:1], "completion_ids": ids[1:]}) + "\n")
    return path


def flops_per_token(shape, seq, training):
    """Model FLOPs per token as in the PaLM paper's MFU: 2 per weight in a matmul (the output
    head included, the embedding lookup not) forward, 3x that with backward, plus attention
    scores and values (4 * layers * heads * head_dim * seq forward; not halved for the mask)."""
    d, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    hd = shape.get("head_dim", d // shape["num_attention_heads"])
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    weights = layers * (d * q + 2 * d * kv + q * d + 3 * d * f) + d * shape["vocab_size"]
    forward = 2 * weights + 4 * layers * q * seq
    return 3 * forward if training else forward


# Dense bf16 tensor-core peak (FLOP/s) by device name, from the vendors' data sheets.
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12)]


def peak_flops(name):
    return next((p for key, p in PEAK_BF16 if key in name), None)


def kd_distill_cmd(teacher, student, data, out, batch, seq, steps, device, *extra):
    return [BIN / "kd-distill", "--teacher", teacher, "--student", student, "--data", data, "--out", out,
            "--steps", steps, "--batch-size", batch, "--seq-len", seq, "--device", device, *extra]


def compiled_reference(run, what=""):
    """`run()`: the reference under torch.compile, run once (compiling costs minutes on a small
    CPU); None, with the reason on stderr, where compilation fails."""
    try:
        return run()
    except RuntimeError as e:
        print(f"torch.compile variant failed{what}: {e}", file=sys.stderr)
        return None


def reference_cmd(mode, *args):
    return [sys.executable, ROOT / "scripts" / "bench_reference.py", mode, *args]


def reference_distill_cmd(teacher, student, batch, seq, steps, warmup, device, bf16):
    return reference_cmd("distill", "--teacher", teacher, "--student", student, "--batch", batch, "--seq", seq,
                         "--steps", steps, "--warmup", warmup, "--device", device, *(["--bf16"] if bf16 else []))


def reference_tokens_per_second(output):
    """The reference prints one JSON line last."""
    return json.loads(output.strip().splitlines()[-1])["tokens_per_second"]


def largest_batch(try_batch, start, limit=64):
    """Doubles the batch from `start` while `try_batch(b)` succeeds; returns the last success."""
    best, b = None, start
    while b <= limit:
        try:
            try_batch(b)
        except RuntimeError as e:
            print(f"batch {b} does not run: {e}", file=sys.stderr)
            if best is None:
                raise RuntimeError(f"not even batch {start} runs") from e
            break
        best, b = b, b * 2
    return best


def bench(shapes, device, bf16, workdir, compile_reference=True):
    w = Path(workdir)
    dtype = torch.bfloat16 if bf16 else torch.float32
    teacher = make_model(shapes["teacher"], w / "teacher", dtype)
    student = make_model(shapes["student"], w / "student", torch.float32)
    seq, steps, warm = shapes["seq"], shapes["steps"], shapes["warmup"]
    b = shapes["batch"]
    if b == "largest":
        # The largest power-of-two batch at which both sides run a step: the same batch for
        # both, so tokens/s and memory compare like with like.
        def try_batch(n):
            d = fixed_length_data(w / "probe.jsonl", shapes["teacher"]["vocab_size"], n * 2, seq)
            shutil.rmtree(w / "probe", ignore_errors=True)
            run_measured(reference_distill_cmd(teacher, student, n, seq, 2, 0, device, bf16))
            run_measured(kd_distill_cmd(teacher, student, d, w / "probe", n, seq, 2, device, "--warmup", 0,
                                        "--dtype", "bf16" if bf16 else "f32"))
        b = largest_batch(try_batch, shapes["batch_start"])
        shapes["batch"] = b
    vocab = shapes["teacher"]["vocab_size"]
    data = fixed_length_data(w / "data.jsonl", vocab, b * steps, seq)
    gpu = device.startswith("cuda")
    flag_bf16 = ["--bf16"] if bf16 else []
    dt = "bf16" if bf16 else "f32"
    reps = shapes["repeats"]

    # Distillation step: teacher forward, student forward + backward, AdamW step.
    def ours_distill(*extra):
        out = w / "distill"
        shutil.rmtree(out, ignore_errors=True)
        _, rss, gmem = run_measured(kd_distill_cmd(teacher, student, data, out, b, seq, steps, device, "--warmup", 0,
                                                   "--dtype", dt, "--lr", 1e-4, *extra), gpu)
        secs = [float(r["seconds"]) for r in csv.DictReader(open(out / "metrics.csv"))]
        step = statistics.median([t1 - t0 for t0, t1 in zip(secs[warm - 1:], secs[warm:])])
        return b * seq / step, rss, gmem

    def ref_distill(*extra):
        o, rss, gmem = run_measured(reference_distill_cmd(teacher, student, b, seq, steps, warm, device, bf16) + list(extra),
                                    gpu)
        return reference_tokens_per_second(o), rss, gmem

    # Teacher generation (greedy, fixed length).
    prompts = w / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(shapes["gen_batch"]):
            f.write(json.dumps({"id": f"p{i}", "prompt": "In the beginning God created the heaven " * 3}) + "\n")

    def ours_generate():
        o, rss, gmem = run_measured([BIN / "kd-generate", "--teacher", teacher, "--prompts", prompts, "--out",
                                     w / "gen.jsonl", "--max-new-tokens", shapes["gen_new"], "--batch-size",
                                     shapes["gen_batch"], "--ignore-eos", "--device", device, "--dtype", dt], gpu)
        return float(o.split("tokens/s")[0].split("(")[-1]), rss, gmem

    def ref_generate():
        o, rss, gmem = run_measured(reference_cmd("generate", "--teacher", teacher, "--batch", shapes["gen_batch"],
                                                  "--prompt-len", shapes["prompt_len"], "--new", shapes["gen_new"],
                                                  "--device", device, *flag_bf16), gpu)
        return reference_tokens_per_second(o), rss, gmem

    # Evaluation (perplexity over fixed-length sequences).
    def ours_eval():
        metrics = w / "eval.json"
        _, rss, gmem = run_measured([BIN / "kd-eval", "--model", teacher, "--data", data, "--out", metrics,
                                     "--batch-size", b, "--device", device, "--dtype", dt], gpu)
        return json.loads(metrics.read_text())["perplexity_tokens_per_second"], rss, gmem

    def ref_eval(*extra):
        o, rss, gmem = run_measured(reference_cmd("eval", "--teacher", teacher, "--batch", b, "--seq", seq,
                                                  "--batches", steps, "--device", device, *flag_bf16, *extra), gpu)
        return reference_tokens_per_second(o), rss, gmem

    rows = []
    # Generation has no compiled variant: transformers' generate recompiles as the cache grows.
    for name, ours, theirs, compilable in [("distillation step", ours_distill, ref_distill, True),
                                           (f"generation (batch {shapes['gen_batch']})", ours_generate, ref_generate, False),
                                           ("evaluation (perplexity)", ours_eval, ref_eval, True)]:
        rows.append((name, *alternate(ours, theirs, reps),
                     compiled_reference(lambda: theirs("--compile")) if compilable and compile_reference else None))
    lean = None
    if gpu:
        # The GPU trainer keeps autograd's graph of every layer unless asked: the lean layers
        # (the CPU's default) once, against the same reference figures.
        lean = ours_distill("--gradient-checkpointing", "--checkpoint-layers", 0)
    return rows, lean


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
        _, rss, _ = run_measured(kd_distill_cmd(t, s, data, w / "out", 8, 512, 2, device))
        _, ref_rss, _ = run_measured(reference_distill_cmd(t, s, 8, 512, 2, 0, device, False))
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
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant of the reference")
    p.add_argument("--repeats", type=int, help="runs of each side per workload (default: 3 on CPU, 1 on GPU)")
    a = p.parse_args()
    device = "cuda" if a.gpu else "cpu"
    shapes = dict(GPU_SHAPES if a.gpu else CPU_SHAPES)
    if a.repeats:
        shapes["repeats"] = a.repeats
    cpu = platform.processor() or platform.machine()
    with tempfile.TemporaryDirectory() as work:
        rows, lean = bench(shapes, device, a.gpu, work, compile_reference=not a.no_compile)
        vocab = [] if (a.no_vocab or a.gpu) else vocab_memory(work, device)
    where = torch.cuda.get_device_name(0) if a.gpu else f"CPU ({os.cpu_count()} cores, {cpu})"
    t, s = shapes["teacher"], shapes["student"]
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `make bench` (`python scripts/bench.py`) on {where}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Distillery and the PyTorch reference "
        "(`scripts/bench_reference.py`: transformers models with SDPA attention, the same KD loss, torch AdamW "
        "(fused on CUDA)) run the same shapes in one run, "
        + ("the reference both eager and under `torch.compile`; the speed and memory ratios are against the faster "
           "of the two." if not a.no_compile else "the reference eager only (`--no-compile`)."),
        "",
        f"Teacher: Llama, hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, vocabulary {t['vocab_size']}. "
        f"Student: hidden {s['hidden_size']}, {s['num_hidden_layers']} layers. Batch {shapes['batch']}, "
        f"sequence {shapes['seq']}, {'bf16 (Distillery: a bf16 compute copy with fp32 masters; PyTorch: bf16 autocast)' if a.gpu else 'fp32'}.",
        "",
        f"Distillery and eager PyTorch ran {shapes['repeats']} time(s) each, alternating; tokens/s is the median over "
        "runs (a run's step time is the median over its steps after warm-up), the range is the lowest and highest "
        "ratio of one pair of back-to-back runs (against eager), and peak memory is the largest seen. The compiled "
        "reference ran once, after them (compilation excluded from its time).",
        "",
        "| workload | Distillery tokens/s | PyTorch eager | PyTorch compiled | speed ratio (best) | range (eager pairs) "
        "| Distillery peak memory | best reference's peak memory | memory ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    versus_best = []  # (ours, the faster reference's tokens/s, which one) per workload
    for name, ours, eager, lo, hi, rss, ref_rss, g, rg, comp in rows:
        compiled_wins = comp is not None and comp[0] > eager
        best, best_mem = (comp[0], comp[2] if a.gpu else comp[1]) if compiled_wins else (eager, rg if a.gpu else ref_rss)
        which = "compiled" if compiled_wins else "eager"
        mem = g if a.gpu else rss
        mem_ratio = "–" if not (mem and best_mem) else f"{mem / best_mem:.2f}x"
        comp_txt = "–" if comp is None else f"{comp[0]:.0f}"
        lines.append(f"| {name} | {ours:.0f} | {eager:.0f} | {comp_txt} | {ours / best:.2f}x ({which}) | "
                     f"{lo:.2f}–{hi:.2f}x | {mib(mem)} | {mib(best_mem)} | {mem_ratio} |")
        versus_best.append((ours, best, which))
    (ours_tps, ref_tps, which) = versus_best[0]
    if lean:
        tps, _, gmem = lean
        ref_mem = rows[0][8] if which == "eager" else rows[0][9][2]
        mem_ratio = f" ({gmem / ref_mem:.2f}x the reference's)" if gmem and ref_mem else ""
        lines += ["", f"The distillation step with lean layers (`--gradient-checkpointing --checkpoint-layers 0`: every "
                  f"student layer keeps only what its hand-written backward pass reads, none recomputed), one run: "
                  f"{tps:.0f} tokens/s ({tps / ref_tps:.2f}x the {which} reference), peak GPU memory {mib(gmem)}{mem_ratio}."]
    tokens = shapes["batch"] * shapes["seq"]
    lines += ["", f"Distillation step time ({tokens} tokens): Distillery {1000 * tokens / ours_tps:.0f} ms, "
              f"PyTorch ({which}) {1000 * tokens / ref_tps:.0f} ms."]
    if a.gpu:
        fpt = flops_per_token(s, shapes["seq"], True) + flops_per_token(t, shapes["seq"], False)
        peak = peak_flops(where)
        ours, theirs, _ = versus_best[0]
        if peak:
            lines += ["", f"Model FLOPs utilisation of the distillation step (student forward and backward plus teacher "
                      f"forward, {fpt / 1e9:.1f} GFLOP per token, against {peak / 1e12:.0f} TFLOP/s dense bf16): "
                      f"Distillery {fpt * ours / peak:.1%}, PyTorch {fpt * theirs / peak:.1%}."]
        else:
            lines += ["", f"MFU not computed: no bf16 peak known for {where} (PEAK_BF16 in scripts/bench.py)."]
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
                  "Llama-3.2-3B-shaped teacher and a Llama-3.2-1B-shaped student (random weights, bf16, "
                  "sequence 1024, vocabulary 128256) at the largest power-of-two batch both sides fit, generation at "
                  "batch 32, GPU memory sampled with nvidia-smi, the distillation step's model FLOPs utilisation, and "
                  "the step once more with lean layers (`--gradient-checkpointing --checkpoint-layers 0`). "
                  "No session so far has had a GPU, so it has not been run: no GPU figure is claimed."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text + kept_sections(Path(a.out), text))


def replace_section(path, heading, text):
    """Writes `text` (starting with `## heading`) into the markdown file at `path` in place of
    its section of that heading, or at the end; the other sections stay as they are."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    marker = f"\n## {heading}\n"
    if marker in old:
        head, rest = old.split(marker, 1)
        tail = rest.split("\n## ", 1)
        old = head + ("\n## " + tail[1] if len(tail) > 1 else "\n")
    path.write_text(old.rstrip("\n") + "\n\n" + text)


def kept_sections(path, text):
    """Sections of the existing file that other benchmark scripts wrote (their `## ` headings
    are not among this script's), kept after the new text instead of being overwritten."""
    if not path.exists():
        return ""
    ours = {line for line in text.splitlines() if line.startswith("## ")}
    old = path.read_text().split("\n## ")[1:]
    keep = ["## " + sec.rstrip("\n") for sec in old if "## " + sec.splitlines()[0] not in ours]
    return "".join("\n" + sec + "\n" for sec in keep)


if __name__ == "__main__":
    main()
