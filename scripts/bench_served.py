"""Generation and scoring through a served teacher: records/s and tokens/s of kd-generate
against a llama.cpp `llama-server` on 127.0.0.1 at several numbers of requests in flight,
or (`--score`) of kd-generate --score (teacher-forced top-K of existing text) against
llama-cpp-python's server, the llama.cpp-based server that scores given text.

    python3 scripts/bench_served.py [--teacher data/demo-teacher] [--prompts N] [--tokens N] [--in-flight 1,4,16] [--score]

The teacher is exported to an F32 GGUF with kd-export; the server gets as many slots as the
most requests in flight; every setting generates the same prompts (`--ignore-eos`, so every
completion has `--tokens` tokens) with `--store-logits 20`. Prints a markdown table.
"""
import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import llamacpp  # noqa: E402

BIN = Path(os.environ.get("KD_BIN") or ROOT / "target" / "release")


def export_f32(teacher, d):
    """The teacher as an F32 GGUF in folder `d` (kd-export)."""
    gguf = d / "teacher-f32.gguf"
    subprocess.run([str(BIN / "kd-export"), "--model", teacher, "--format", "gguf", "--type", "f32", "--out", str(gguf)],
                   check=True, capture_output=True)
    return gguf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=str(ROOT / "data" / "demo-teacher"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--in-flight", default="1,4,16")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--score", action="store_true")
    a = ap.parse_args()
    if a.score:
        return score(a)
    levels = [int(x) for x in a.in_flight.split(",")]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        gguf = export_f32(a.teacher, d)
        lines = gzip.open(ROOT / "data" / "kjv" / "prompts.jsonl.gz", "rt").read().splitlines()[: a.prompts]
        prompts = d / "prompts.jsonl"
        prompts.write_text("\n".join(lines) + "\n")
        port = llamacpp.free_port()
        server = llamacpp.serve(gguf, port, ctx=max(levels) * 256, parallel=max(levels))
        rows = []
        try:
            for n in levels:
                out = d / f"out{n}.jsonl"
                res = subprocess.run([str(BIN / "kd-generate"), "--teacher-url", f"http://127.0.0.1:{port}", "--teacher-tokenizer", a.teacher,
                                      "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", str(a.tokens), "--ignore-eos",
                                      "--store-logits", str(a.top_k), "--teacher-concurrency", str(n), "--batch-size", str(a.prompts)],
                                     check=True, capture_output=True, text=True)
                m = re.search(r"(\d+) completions, (\d+) new tokens in ([\d.]+)s", res.stdout)
                recs, toks, secs = int(m.group(1)), int(m.group(2)), float(m.group(3))
                rows.append((n, recs, toks, secs))
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"| requests in flight | records | tokens | seconds | records/s | tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, recs, toks, secs in rows:
        print(f"| {n} | {recs} | {toks} | {secs:.1f} | {recs / secs:.2f} | {toks / secs:.0f} |")


def score(a):
    """kd-generate --score through llama-cpp-python: KJV passages of about --tokens tokens.
    Seconds are the stage's wall time, its start and capability probe included."""
    import time

    levels = [int(x) for x in a.in_flight.split(",")]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        gguf = export_f32(a.teacher, d)
        lines = gzip.open(ROOT / "data" / "kjv" / "train.jsonl.gz", "rt").read().splitlines()[: a.prompts]
        recs = d / "texts.jsonl"
        # A short prompt, then the passage's first --tokens tokens or so (KJV averages about 4
        # characters a token here) as the completion scored (llama-cpp-python has no row for a
        # first token after the BOS alone).
        texts = [json.loads(l)["text"] for l in lines]
        recs.write_text("".join(json.dumps({"id": f"t{i}", "prompt": "Read:", "completion": " " + t[: a.tokens * 4]}) + "\n"
                                for i, t in enumerate(texts)))
        port = llamacpp.free_port()
        server = llamacpp.serve_python(gguf, port)
        rows = []
        try:
            for n in levels:
                t0 = time.perf_counter()
                res = subprocess.run([str(BIN / "kd-generate"), "--score", "--teacher-url", f"http://127.0.0.1:{port}",
                                      "--teacher-tokenizer", a.teacher, "--prompts", str(recs), "--out", str(d / f"s{n}.jsonl"),
                                      "--store-logits", str(a.top_k), "--teacher-top-k", str(a.top_k),
                                      "--teacher-concurrency", str(n), "--batch-size", str(a.prompts)],
                                     capture_output=True, text=True)
                secs = time.perf_counter() - t0
                if res.returncode != 0:
                    raise SystemExit(f"kd-generate --score failed:\n{res.stderr}")
                m = re.search(r"scored (\d+) records, (\d+) positions", res.stdout)
                rows.append((n, int(m.group(1)), int(m.group(2)), secs))
        finally:
            server.terminate()
            server.wait(timeout=30)
    print("| requests in flight | records | scored positions | seconds | records/s | tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, recs_n, toks, secs in rows:
        print(f"| {n} | {recs_n} | {toks} | {secs:.1f} | {recs_n / secs:.2f} | {toks / secs:.0f} |")


if __name__ == "__main__":
    main()
