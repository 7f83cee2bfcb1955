"""--shard I/N and kd-merge: for every sharded stage, the joined shards equal the unsharded
run byte for byte (records, logits sidecar, summary); kd-merge refuses a missing, repeated
or mismatched shard."""
import json

import pytest

from conftest import run_bin, read_jsonl, write_jsonl

# Lengths differ, so that length-sorted batches differ from file order; a and c are
# duplicates, so that kd-filter's dedup crosses shard boundaries.
RECS = [
    {"id": "a", "text": "The quick brown fox jumps over the lazy dog."},
    {"id": "b", "text": "It was the best of times, it was the worst of times, it was the age of wisdom."},
    {"id": "c", "text": "The quick brown fox jumps over the lazy dog."},
    {"id": "d", "text": "A teacher."},
    {"id": "e", "text": "Knowledge distillation trains the student on soft targets from the teacher model."},
    {"id": "f", "prompt": "A teacher model", "completion": " distills its knowledge into a smaller student.",
     "extra": {"kept": True, "weight": 0.1}},
    {"id": "g", "text": "In the beginning God created the heaven and the earth."},
]
PROMPTS = [{"id": f"p{i}", "prompt": p, "x": i / 3} for i, p in enumerate(
    ["The quick", "It was the best of", "A teacher", "In the beginning God", "Numbers like", "The lazy dog jumps", "It"])]


def _shards(tmp_path, run):
    """Runs `run(out, shard_flags)` unsharded and as N = 1, 2, 3 shards joined by kd-merge;
    yields (N, unsharded output, joined output, shard outputs)."""
    whole = tmp_path / "whole" / "out.jsonl"
    whole.parent.mkdir()
    run(whole, [])
    for n in (1, 2, 3):
        parts = []
        for i in range(n):
            p = tmp_path / f"n{n}" / f"s{i}.jsonl"
            p.parent.mkdir(exist_ok=True)
            run(p, ["--shard", f"{i}/{n}"])
            parts.append(p)
        joined = tmp_path / f"joined{n}" / "out.jsonl"
        run_bin("kd-merge", "--out", joined, *reversed(parts))
        yield n, whole, joined, parts


def _same_files(a, b, suffixes):
    for s in suffixes:
        x, y = a.with_name(a.name + s), b.with_name(b.name + s)
        assert x.read_bytes() == y.read_bytes(), f"{x.name} differs"


def test_generate_shards_join_to_the_unsharded_run(trained_llama, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)

    def run(out, flags):
        run_bin("kd-generate", "--teacher", trained_llama, "--prompts", prompts, "--out", out, "--samples", 2,
                "--temperature", 0.9, "--seed", 5, "--max-new-tokens", 6, "--store-logits", 4, "--batch-size", 3,
                "--device", "cpu", *flags)

    for n, whole, joined, parts in _shards(tmp_path, run):
        _same_files(whole, joined, ["", ".logits.safetensors", ".summary.json"])
        if n > 1:
            # A shard holds only its own records, and its pointers start at its own row 0.
            first = read_jsonl(parts[0])
            assert 0 < len(first) < 14 and min(r["teacher_logits"]["row"] for r in first) == 0
    summary = json.loads((whole.parent / "out.jsonl.summary.json").read_text())
    assert summary["outputs"] == 14 and summary["logits"]["bytes_per_token"] > 0


def test_score_shards_join_to_the_unsharded_run_with_compact_logits(trained_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECS)

    def run(out, flags):
        run_bin("kd-generate", "--teacher", trained_llama, "--prompts", data, "--out", out, "--score",
                "--store-logits", 5, "--logits-format", "compact", "--batch-size", 2, "--device", "cpu", *flags)

    for _, whole, joined, _ in _shards(tmp_path, run):
        _same_files(whole, joined, ["", ".logits.topk", ".summary.json"])


def test_filter_shards_join_to_the_unsharded_run(trained_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECS)

    def run(out, flags):
        run_bin("kd-filter", "--teacher", trained_llama, "--data", data, "--out", out, "--dedup", "exact",
                "--min-tokens", 8, "--select", "teacher_confidence:top:0.6", "--max", "teacher_entropy=20",
                "--batch-size", 2, "--device", "cpu", *flags)

    for _, whole, joined, parts in _shards(tmp_path, run):
        _same_files(whole, joined, ["", ".summary.json"])
        # Shards select nothing themselves: every record of the block is there, scored.
        assert sum(len(read_jsonl(p)) for p in parts) == len(RECS)
    summary = json.loads((joined.parent / "out.jsonl.summary.json").read_text())
    assert summary["removed"]["exact_duplicate"] == 1 and summary["removed"]["length"] == 1


def test_eval_shards_recombine_exactly(trained_llama, model_dirs, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECS)
    whole = tmp_path / "whole" / "m.json"
    args = ["--model", model_dirs["llama"], "--teacher", trained_llama, "--data", data, "--batch-size", 2,
            "--bootstrap-samples", 50, "--device", "cpu"]
    run_bin("kd-eval", *args, "--out", whole)
    timing = {"perplexity_seconds", "perplexity_tokens_per_second", "eval_seconds", "peak_rss_bytes"}
    a = json.loads(whole.read_text())
    assert a["tokens"] > 0 and a["teacher_kl"] > 0
    for n in (1, 2, 3):
        parts = [tmp_path / f"n{n}" / f"m{i}.json" for i in range(n)]
        for i, p in enumerate(parts):
            run_bin("kd-eval", *args, "--out", p, "--shard", f"{i}/{n}")
        joined = tmp_path / f"joined{n}" / "m.json"
        run_bin("kd-merge", "--out", joined, *parts)
        assert (whole.parent / "m.items.json").read_bytes() == (joined.parent / "m.items.json").read_bytes()
        b = json.loads(joined.read_text())
        assert set(a) == set(b)
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
        if n > 1:
            # A shard's own figures are its records' only.
            assert json.loads(parts[0].read_text())["records"] < a["records"]


def test_augment_shards_join_to_the_unsharded_run(trained_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECS + PROMPTS)

    def run(out, flags):
        run_bin("kd-augment", "--data", data, "--out", out, "--ops", "delete,resample,mask", "--teacher", trained_llama,
                "--per-record", 2, "--fraction", 0.7, "--seed", 4, "--max-new-tokens", 5, "--device", "cpu", *flags)

    for _, whole, joined, _ in _shards(tmp_path, run):
        _same_files(whole, joined, ["", ".summary.json"])
    assert any(r.get("source") == "augment:resample" for r in read_jsonl(whole))


def test_merge_refuses_missing_repeated_and_mismatched_shards(trained_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECS)

    def shard(i, n, name, *flags):
        out = tmp_path / name
        run_bin("kd-augment", "--data", data, "--out", out, "--ops", "delete", "--seed", 1, "--shard", f"{i}/{n}", *flags)
        return out

    s0, s1, s2 = shard(0, 3, "a.jsonl"), shard(1, 3, "b.jsonl"), shard(2, 3, "c.jsonl")
    out = tmp_path / "j.jsonl"

    def refused(*shards):
        p = run_bin("kd-merge", "--out", out, *shards, check=False)
        assert p.returncode != 0 and not out.exists()
        return p.stderr

    assert "shard 1/3 missing" in refused(s0, s2)
    err = refused(s0, s1, s2, s1)
    assert "shard 1/3 is given twice" in err and "b.jsonl" in err
    other = shard(1, 3, "other.jsonl", "--ratio", 0.5)
    assert "different settings: `ratio`" in refused(s0, other, s2)
    two = shard(1, 2, "two.jsonl")
    assert "count differs" in refused(s0, two)
    plain = write_jsonl(tmp_path / "plain.jsonl", RECS)
    assert "no summary beside it" in refused(s0, plain)
    # Shards of another input file are not one run's either.
    data2 = write_jsonl(tmp_path / "d2.jsonl", RECS[:6])
    run_bin("kd-augment", "--data", data2, "--out", tmp_path / "x.jsonl", "--ops", "delete", "--seed", 1,
            "--shard", "1/3")
    assert "input_fingerprint differs" in refused(s0, tmp_path / "x.jsonl", s2)
    run_bin("kd-merge", "--out", out, s2, s0, s1)
    assert len(read_jsonl(out)) == 2 * len(RECS)


def test_shard_flag_refusals(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", RECS[:2])
    p = run_bin("kd-augment", "--data", data, "--out", tmp_path / "o.jsonl", "--ops", "delete", "--shard", "2/2",
                check=False)
    assert p.returncode != 0 and "counted from 0" in p.stderr
    p = run_bin("kd-augment", "--data", data, "--out", tmp_path / "o.jsonl", "--ops", "delete", "--shard", "0/3",
                check=False)
    assert p.returncode != 0 and "only 2 records" in p.stderr and not (tmp_path / "o.jsonl").exists()
