"""A stand-in for kd-filter written by someone else: keeps records whose completion has at
least MIN_WORDS words. It honours the record contract (unknown fields kept, atomic write)
and accepts kd-filter's flags, using only --data and --out."""
import argparse
import json
import os

MIN_WORDS = 3

p = argparse.ArgumentParser()
p.add_argument("--data", required=True)
p.add_argument("--out", required=True)
args, _ = p.parse_known_args()
kept = [r for r in map(json.loads, open(args.data)) if len(r.get("completion", r.get("text", "")).split()) >= MIN_WORDS]
tmp = args.out + ".tmp"
with open(tmp, "w") as f:
    for r in kept:
        r.setdefault("scores", {})["outside_filter"] = 1.0
        f.write(json.dumps(r) + "\n")
os.replace(tmp, args.out)
