"""`make pipeline` end to end on a shortened configuration of the embedded default, and with
one stage swapped for an outside program."""
import json
import os
import subprocess
from pathlib import Path

from conftest import ROOT, read_jsonl

SHORT = ["PROMPTS_N=24", "CORPUS_N=40", "CALIB_N=8", "GEN_TOKENS=12", "STEPS=6", "CHAIN_STEPS=3", "FT_STEPS=3",
         "BATCH=4", "SEQ_LEN=64", "EVAL_N=8", "HELDOUT_N=16"]


def make(run_dir, *extra):
    proc = subprocess.run(["make", "--no-print-directory", "pipeline", f"RUN={run_dir}", *SHORT, *extra],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "MAKEFLAGS": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_short_pipeline_end_to_end(tmp_path):
    run = tmp_path / "run"
    make(run)
    report = (run / "report" / "report.md").read_text()
    for name in ["teacher", "pruned-init", "distilled", "ce-baseline", "TA1", "chain-student", "finetuned"]:
        assert f"| {name} |" in report
    assert "Distilled student against the baseline" in report
    assert (run / "report" / "size_vs_quality.svg").exists()
    assert (run / "eval" / "samples.md").read_text().count("**Teacher:**") == 8
    filtered = read_jsonl(run / "filtered.jsonl")
    assert all("kl_teacher_student" in r["scores"] for r in filtered)
    assert any(r["source"].startswith("augment:") for r in read_jsonl(run / "augmented.jsonl"))
    # Everything is up to date: a second run does nothing but report.
    again = make(run)
    assert "kd-distill" not in again.stdout
    # Removing one stage's output re-runs that stage and what depends on it only.
    (run / "finetuned" / "model.safetensors").unlink()
    third = make(run)
    assert "kd-finetune" in third.stdout and "kd-distill" not in third.stdout
    assert (run / "finetuned" / "model.safetensors").exists()


def test_pipeline_with_an_outside_filter(tmp_path):
    run = tmp_path / "run"
    make(run, f"FILTER_CMD=python3 {ROOT / 'tests' / 'outside_filter.py'}")
    filtered = read_jsonl(run / "filtered.jsonl")
    assert filtered and all(r["scores"] == {"outside_filter": 1.0} for r in filtered)
    assert all(len(r["completion"].split()) >= 3 for r in filtered)
    assert (run / "report" / "report.md").exists()
