"""Generation through a served teacher: records/s and tokens/s of kd-generate against a
llama.cpp `llama-server` on 127.0.0.1 at several numbers of requests in flight.

    python3 scripts/bench_served.py [--teacher data/demo-teacher] [--prompts N] [--tokens N] [--in-flight 1,4,16]

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=str(ROOT / "data" / "demo-teacher"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--in-flight", default="1,4,16")
    ap.add_argument("--top-k", type=int, default=20)
    a = ap.parse_args()
    levels = [int(x) for x in a.in_flight.split(",")]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        gguf = d / "teacher-f32.gguf"
        subprocess.run([str(BIN / "kd-export"), "--model", a.teacher, "--format", "gguf", "--type", "f32", "--out", str(gguf)],
                       check=True, capture_output=True)
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


if __name__ == "__main__":
    main()
