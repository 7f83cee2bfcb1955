"""Offline-logits sidecars: bytes per stored token and write/read throughput of the
safetensors and compact formats at K = 16, 32, 64, 128 (docs/BENCHMARKS.md, "Offline-logits
sidecars"):

    make build && .venv/bin/python scripts/bench_logits.py [--teacher DIR] [--records N]

The teacher scores held-out KJV passages (`kd-generate --score --store-logits K`, safetensors);
`kd-logits convert` rewrites each sidecar in the compact format and back (the time of encoding
and writing the whole file), and `kd-logits read` reads every record's rows through the reader
training uses. Rates are the median of --repeats runs.
"""
import argparse
import json
import re
import statistics
from pathlib import Path

from experiments import BIN, ROOT, TEACHER, sh, unpack


def rate(text, unit):
    return float(re.search(r"([0-9.]+) " + unit, text).group(1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-logits"))
    p.add_argument("--teacher", default=str(TEACHER))
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = unpack("heldout", work / "heldout.jsonl", n=a.records)
    lines = ["| K | safetensors bytes/token | compact bytes/token | ratio | write rows/s (safetensors / compact) "
             "| read rows/s (safetensors / compact) |", "|---:|---:|---:|---:|---:|---:|"]
    for k in [16, 32, 64, 128]:
        old = work / f"k{k}.jsonl"
        if not old.exists():
            sh(BIN / "kd-generate", "--teacher", a.teacher, "--prompts", data, "--out", old, "--score", "--store-logits", k,
               "--batch-size", 16, "--device", "cpu")
        rows = json.loads(Path(f"{old}.summary.json").read_text())["logits"]["rows"]
        new, back = work / f"k{k}-compact.jsonl", work / f"k{k}-back.jsonl"
        write = {"compact": [], "safetensors": []}
        read = {"compact": [], "safetensors": []}
        for _ in range(a.repeats):
            write["compact"].append(rate(sh(BIN / "kd-logits", "convert", "--data", old, "--out", new, "--format", "compact"),
                                         "rows/s"))
            write["safetensors"].append(rate(sh(BIN / "kd-logits", "convert", "--data", new, "--out", back, "--format",
                                                "safetensors"), "rows/s"))
            read["safetensors"].append(rate(sh(BIN / "kd-logits", "read", "--data", old), "rows/s"))
            read["compact"].append(rate(sh(BIN / "kd-logits", "read", "--data", new), "rows/s"))
        b_old = Path(f"{old}.logits.safetensors").stat().st_size / rows
        b_new = Path(f"{new}.logits.topk").stat().st_size / rows
        med = {key: {f: statistics.median(v) for f, v in d.items()} for key, d in [("w", write), ("r", read)]}
        lines.append(f"| {k} | {b_old:.1f} | {b_new:.1f} | {b_old / b_new:.2f}x | "
                     f"{med['w']['safetensors']:,.0f} / {med['w']['compact']:,.0f} | "
                     f"{med['r']['safetensors']:,.0f} / {med['r']['compact']:,.0f} |")
    print(f"Teacher: {Path(a.teacher).name}; {a.records} held-out KJV passages, {rows} stored tokens each K.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
