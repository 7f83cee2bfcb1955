"""The compact top-K sidecar (`--logits-format compact`): it round-trips against the
safetensors sidecar of the same run (ids exact, log-probabilities within half a step, tail
mass exact), the Python reader in scripts/ reads it, it stays under 120 bytes per token at
K = 64 on the demo teacher and on SmolLM2, a corrupt or cut-off file is an error naming the record, and
offline KD from it trains like KD from the uncompressed sidecar."""
import gzip
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_bin, read_jsonl, write_jsonl
import tiny

sys.path.insert(0, str(ROOT / "scripts"))
import read_topk  # noqa: E402

STEP = 1 / 16
CORPUS_TEXTS = sorted(set(tiny.CORPUS))


@pytest.fixture(scope="module")
def narrow_student(trained_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("students") / "narrow"
    run_bin("kd-init", "--teacher", trained_llama, "--out", out, "--layers", 2, "--heads", 2, "--kv-heads", 1,
            "--intermediate", 64, "--seed", 3, "--device", "cpu")
    return out


def _score(teacher, data, out, k, fmt, *flags):
    return run_bin("kd-generate", "--teacher", teacher, "--prompts", data, "--out", out, "--score", "--store-logits", k,
                   "--logits-format", fmt, "--batch-size", 4, "--device", "cpu", *flags)


@pytest.fixture(scope="module")
def both(trained_llama, tmp_path_factory):
    """The same records scored into both formats."""
    d = tmp_path_factory.mktemp("compact")
    data = write_jsonl(d / "d.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(CORPUS_TEXTS)])
    _score(trained_llama, data, d / "old.jsonl", 16, "safetensors")
    proc = _score(trained_llama, data, d / "new.jsonl", 16, "compact")
    return d, proc


def test_round_trip_against_the_uncompressed_sidecar(both):
    d, proc = both
    assert "bytes per stored token (compact)" in proc.stdout
    assert_round_trip(d, 16)
    summary = json.loads((d / "new.jsonl.summary.json").read_text())
    old_summary = json.loads((d / "old.jsonl.summary.json").read_text())
    assert summary["logits"]["format"] == "compact" and old_summary["logits"]["format"] == "safetensors"
    assert summary["logits"]["bytes_per_token"] < old_summary["logits"]["bytes_per_token"] / 2


def assert_round_trip(d, k):
    """`d/new.jsonl` (compact) holds the rows of `d/old.jsonl` (safetensors), read back by the
    Python reader, by index and streamed."""
    old, new = read_jsonl(d / "old.jsonl"), read_jsonl(d / "new.jsonl")
    stored = load_file(d / "old.jsonl.logits.safetensors")
    topk = read_topk.TopKFile(str(d / "new.jsonl.logits.topk"))
    assert topk.k == k and topk.step == STEP and topk.version == 2
    rows_seen = 0
    for a, b in zip(old, new):
        assert {k: v for k, v in a.items() if k != "teacher_logits"} == {k: v for k, v in b.items() if k != "teacher_logits"}
        pa, pb = a["teacher_logits"], b["teacher_logits"]
        assert (pa["row"], pa["rows"]) == (pb["row"], pb["rows"]) and pb["file"] == "new.jsonl.logits.topk"
        got = topk.rows(pb["row"], pb["rows"])
        for i, (ids, lps, tail) in enumerate(got):
            r = pa["row"] + i
            want_ids = stored["indices"][r].tolist()
            want_lp = dict(zip(want_ids, stored["logprobs"][r].float().tolist()))
            assert sorted(ids) == sorted(want_ids)                      # ids exact
            assert all(abs(lp - want_lp[t]) <= STEP / 2 + 1e-6 for t, lp in zip(ids, lps))
            assert lps == sorted(lps, reverse=True)                     # most likely first
            assert tail == stored["tail_logmass"][r].float().item()     # float16, exact
            rows_seen += 1
    assert rows_seen == stored["indices"].shape[0] > 0
    # Streaming the blocks gives the same rows as the index.
    streamed = [row for _, rows in topk for row in rows]
    assert len(streamed) == rows_seen


def test_under_120_bytes_per_token_at_k64_on_the_demo_teacher(tmp_path):
    with gzip.open(ROOT / "data" / "kjv" / "heldout.jsonl.gz", "rt") as f:
        texts = [json.loads(next(f))["text"] for _ in range(6)]
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)])
    _score(ROOT / "data" / "demo-teacher", data, tmp_path / "s.jsonl", 64, "compact")
    summary = json.loads((tmp_path / "s.jsonl.summary.json").read_text())
    assert summary["logits"]["rows"] > 100 and summary["logits"]["bytes_per_token"] <= 120, summary


def test_under_120_bytes_per_token_at_k64_on_a_real_teacher(smollm2_gguf, tmp_path):
    """SmolLM2-135M-Instruct (49,152 tokens): version 1's sorted-id gaps took 140 bytes here."""
    with gzip.open(ROOT / "data" / "kjv" / "heldout.jsonl.gz", "rt") as f:
        texts = [json.loads(next(f))["text"] for _ in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)])
    _score(smollm2_gguf, data, tmp_path / "old.jsonl", 64, "safetensors")
    run_bin("kd-logits", "convert", "--data", tmp_path / "old.jsonl", "--out", tmp_path / "new.jsonl")
    assert_round_trip(tmp_path, 64)
    rows = load_file(tmp_path / "old.jsonl.logits.safetensors")["indices"].shape[0]
    per_token = (tmp_path / "new.jsonl.logits.topk").stat().st_size / rows
    assert rows > 300 and per_token <= 120, per_token


def test_corrupt_or_truncated_sidecar_names_the_record(trained_llama, narrow_student, both, tmp_path):
    d, _ = both
    blob = (d / "new.jsonl.logits.topk").read_bytes()
    topk = read_topk.TopKFile(str(d / "new.jsonl.logits.topk"))
    offset, first, rows = topk.blocks[2]
    flipped = bytearray(blob)
    flipped[offset + 17 + 3] ^= 0x40
    cut = blob[: offset + 20]
    for name, content, words in [("flipped", bytes(flipped), ["record 2", "record block 2", "checksum"]),
                                 ("cut", cut, ["truncated", "2 whole record blocks", f"rows 0..{first}"])]:
        side = tmp_path / f"{name}.topk"
        side.write_bytes(content)
        p = run_bin("kd-distill", "--student", narrow_student, "--data", d / "new.jsonl", "--out", tmp_path / name,
                    "--teacher-logits", side, "--alpha", 0, "--beta", 1, "--steps", 2, "--batch-size", 8,
                    "--device", "cpu", check=False)
        assert p.returncode != 0 and all(w in p.stderr for w in words), p.stderr
        with pytest.raises(ValueError):
            t = read_topk.TopKFile(str(side))
            t.rows(first, rows)


def test_offline_kd_from_compact_trains_like_uncompressed(trained_llama, narrow_student, held_out, both, tmp_path):
    d, _ = both
    kl = {}
    for fmt, side in {"safetensors": d / "old.jsonl.logits.safetensors", "compact": d / "new.jsonl.logits.topk"}.items():
        out = tmp_path / fmt
        run_bin("kd-distill", "--student", narrow_student, "--data", d / f"{'old' if fmt == 'safetensors' else 'new'}.jsonl",
                "--out", out, "--teacher-logits", side, "--alpha", 0, "--beta", 1, "--steps", 30, "--batch-size", 4,
                "--lr", 3e-3, "--seed", 1, "--device", "cpu")
        run_bin("kd-eval", "--model", out, "--teacher", trained_llama, "--data", held_out, "--out", tmp_path / f"{fmt}.json",
                "--bootstrap-samples", 10, "--device", "cpu")
        kl[fmt] = json.loads((tmp_path / f"{fmt}.json").read_text())["teacher_kl"]
    assert abs(kl["compact"] - kl["safetensors"]) / kl["safetensors"] < 0.02, kl


def test_kd_logits_converts_to_the_same_bytes_kd_generate_writes(both, tmp_path):
    d, _ = both
    out = tmp_path / "new.jsonl"
    p = run_bin("kd-logits", "convert", "--data", d / "old.jsonl", "--out", out, "--format", "compact")
    assert "compact" in p.stdout and "rows/s" in p.stdout
    # The same rows encode to the same file, and the records differ only in their pointers' file name.
    assert (tmp_path / "new.jsonl.logits.topk").read_bytes() == (d / "new.jsonl.logits.topk").read_bytes()
    assert out.read_bytes() == (d / "new.jsonl").read_bytes()
    rows = sum(r["teacher_logits"]["rows"] for r in read_jsonl(out))
    assert f"read {rows} rows" in run_bin("kd-logits", "read", "--data", out).stdout
