"""Our forward pass and decoding against transformers on tiny random checkpoints of every
supported architecture."""
import json

import pytest

import reference
from conftest import TEXTS, run_bin, read_jsonl, write_jsonl
import tiny


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_perplexity_matches_transformers(arch, model_dirs, text_data, tmp_path):
    out = tmp_path / "metrics.json"
    # batch size 2 mixes lengths, so right padding is exercised.
    proc = run_bin("kd-eval", "--model", model_dirs[arch], "--data", text_data, "--out", out,
                   "--batch-size", 2, "--device", "cpu")
    ours = json.loads(out.read_text())
    theirs = reference.perplexity(model_dirs[arch], TEXTS)
    assert abs(ours["perplexity"] - theirs) / theirs < 1e-4, (ours["perplexity"], theirs)
    assert "perplexity" in proc.stdout
    assert ours["records"] == len(TEXTS)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_greedy_generation_matches_transformers(arch, model_dirs, tmp_path):
    prompts = ["The quick brown", "A teacher model distills its knowledge into", "It", "Numbers like 12"]
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)])
    out = tmp_path / "gen.jsonl"
    run_bin("kd-generate", "--teacher", model_dirs[arch], "--prompts", data, "--out", out,
            "--max-new-tokens", 20, "--temperature", 0, "--batch-size", 3, "--device", "cpu")
    recs = read_jsonl(out)
    expected = reference.greedy(model_dirs[arch], prompts, 20)
    assert [r["completion_ids"] for r in recs] == expected
    for r, p in zip(recs, prompts):
        assert r["prompt"] == p and r["source"] == "teacher" and r["teacher"]["temperature"] == 0
        assert r["prompt_ids"][0] == 0  # BOS from add_special_tokens


def test_sampling_is_seeded_and_batch_independent(model_dirs, tmp_path):
    prompts = ["The quick brown", "A teacher model", "It was"]
    data = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)])
    runs = []
    for name, batch in [("a", 4), ("b", 1), ("c", 4)]:
        out = tmp_path / f"{name}.jsonl"
        run_bin("kd-generate", "--teacher", model_dirs["llama"], "--prompts", data, "--out", out,
                "--max-new-tokens", 12, "--temperature", 1.0, "--top-k", 50, "--top-p", 0.9,
                "--samples", 2, "--seed", 7, "--batch-size", batch, "--device", "cpu")
        runs.append([r["completion_ids"] for r in read_jsonl(out)])
    assert runs[0] == runs[1] == runs[2]
    recs = read_jsonl(tmp_path / "a.jsonl")
    assert [r["id"] for r in recs] == ["p0#s0", "p0#s1", "p1#s0", "p1#s1", "p2#s0", "p2#s1"]
    assert recs[1]["parent"] == "p0"
    # Two samples of one prompt differ (12 tokens from a peaked but random model).
    assert recs[0]["completion_ids"] != recs[1]["completion_ids"]
