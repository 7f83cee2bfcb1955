"""Builds the embedded default corpus (data/kjv/) from the King James Version of the Bible.

Provenance: Debian's `bible-kjv-text` package (the KJV text, public domain: the 1611
translation's copyright has long expired) read through Debian's `bible-kjv` program:

    apt-get install bible-kjv
    bible -l0 "Gen1:1-Rev22:21" > kjv.txt
    python3 scripts/build_corpus.py kjv.txt data/kjv

Outputs (gzipped JSON Lines, CONTRACT.md records):
  train.jsonl.gz    passages of consecutive verses (about 95% of chapters)
  heldout.jsonl.gz  passages from the other chapters (perplexity, teacher KL)
  prompts.jsonl.gz  openings of training passages, for teacher generation
  eval_mc.jsonl.gz  multiple choice from held-out verses: the true continuation
                    against three continuations of other verses (scored by log-likelihood)
  eval_cloze.jsonl.gz  held-out verses without their last word (LAMBADA-style cloze)
  task.jsonl.gz     prompt/completion pairs (verse opening -> rest of verse) for fine-tuning
The split is seeded and deterministic.
"""
import gzip
import json
import random
import re
import sys
from pathlib import Path


def parse(path):
    """Yields (book_chapter, verse_number, text)."""
    chapter = None
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m and chapter:
            yield chapter, int(m.group(1)), m.group(2).strip()
        else:
            chapter = line.strip()


def passages(verses, max_chars=480):
    """Groups a chapter's verses into passages of at most max_chars characters."""
    out, cur = [], []
    for v, text in verses:
        if cur and sum(len(t) + 1 for _, t in cur) + len(text) > max_chars:
            out.append(cur)
            cur = []
        cur.append((v, text))
    if cur:
        out.append(cur)
    return out


def write(path, records):
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{path}: {len(records)} records")


def main(src, out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chapters = {}
    for chap, v, text in parse(src):
        chapters.setdefault(chap, []).append((v, text))
    names = sorted(chapters)
    rng = random.Random(1611)
    held = set(rng.sample(names, k=max(1, len(names) // 20)))
    train, heldout, held_verses = [], [], []
    for chap in names:
        for p in passages(chapters[chap]):
            rid = f"{chap.replace(' ', '')}:{p[0][0]}-{p[-1][0]}"
            rec = {"id": rid, "text": " ".join(t for _, t in p), "source": "corpus"}
            (heldout if chap in held else train).append(rec)
        if chap in held:
            held_verses += [(f"{chap.replace(' ', '')}:{v}", t) for v, t in chapters[chap]]
    write(out / "train.jsonl.gz", train)
    write(out / "heldout.jsonl.gz", heldout)

    prompts = []
    for r in train:
        words = r["text"].split()
        if len(words) >= 12:
            prompts.append({"id": "gen-" + r["id"], "prompt": " ".join(words[:8]), "parent": r["id"]})
    write(out / "prompts.jsonl.gz", prompts)

    rng = random.Random(42)
    usable = [(i, t) for i, t in held_verses if len(t.split()) >= 12]
    mc, cloze = [], []
    for k, (vid, text) in enumerate(usable):
        words = text.split()
        cut = len(words) // 2
        context, truth = " ".join(words[:cut]), " " + " ".join(words[cut:])
        distractors = []
        while len(distractors) < 3:
            _, other = rng.choice(usable)
            ow = other.split()
            cand = " " + " ".join(ow[len(ow) // 2:])
            if cand != truth and cand not in distractors:
                distractors.append(cand)
        label = rng.randrange(4)
        choices = distractors[:label] + [truth] + distractors[label:]
        mc.append({"id": f"mc-{vid}", "prompt": context, "choices": choices, "label": label, "task": "mc"})
        last = re.match(r"^(.*\s)(\w+)([^\w]*)$", text)
        if last:
            cloze.append({"id": f"cloze-{vid}", "prompt": last.group(1).rstrip(), "completion": " " + last.group(2),
                          "task": "cloze"})
    write(out / "eval_mc.jsonl.gz", mc[:400])
    write(out / "eval_cloze.jsonl.gz", cloze[:400])

    task = []
    for r in train[: len(train) // 4]:
        words = r["text"].split()
        if len(words) >= 10:
            cut = max(4, len(words) // 3)
            task.append({"id": "task-" + r["id"], "prompt": " ".join(words[:cut]),
                         "completion": " " + " ".join(words[cut:]), "source": "task"})
    write(out / "task.jsonl.gz", task)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
