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
    assert (run / "report" / "size_vs_quality.svg").exists() and (run / "report" / "size_vs_quality.png").exists()
    # Intervals beside the figures, paired verdicts, and the card with every stage's command.
    assert "McNemar exact p = " in report and "paired bootstrap over 16 records" in report
    card = report.split("## Reproducibility card")[1]
    for stage in ["kd-init", "kd-generate", "kd-filter", "kd-augment", "kd-distill", "kd-chain", "kd-finetune", "kd-eval"]:
        assert f"/{stage} " in card, stage
    assert "transformers " in card and (run / "report" / "report.html").exists()
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


SWEEP_SHORT = ["SIZES=4x 8x", "STRATEGIES=ce kd", "SEEDS=0 1", "PROMPTS_N=16", "CORPUS_N=30", "CALIB_N=8", "GEN_TOKENS=8",
               "STEPS=3", "BATCH=4", "SEQ_LEN=64", "HELDOUT_N=12", "EVAL_N=12", "GEN_N=2"]


def test_short_sweep_end_to_end(tmp_path):
    run = tmp_path / "sweep"
    proc = subprocess.run(["make", "--no-print-directory", "sweep", f"RUN={run}", *SWEEP_SHORT], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "MAKEFLAGS": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (run / "report" / "report.md").read_text()
    for name in ["teacher", "ce-4x-s0", "ce-4x-s1", "kd-8x-s1", "chain-8x-s0", "chain-8x-s1"]:
        assert f"| {name} |" in md, name
    # Every KD and chain student is judged against the CE student of its size and seed.
    for name, base in [("kd-4x-s0", "ce-4x-s0"), ("kd-8x-s1", "ce-8x-s1"), ("chain-8x-s1", "ce-8x-s1")]:
        assert f"| {name} | {base} |" in md
    assert "## Strategies by size, over seeds" in md and (run / "report" / "report.html").exists()
    chain = json.loads((run / "models" / "chain-8x-s0" / "chain.json").read_text())
    assert [h["shape"] for h in chain["hops"]][1].startswith("--layers 2 --hidden 80")
    # Resumable: a second run finds everything done.
    again = subprocess.run(["make", "--no-print-directory", "sweep", f"RUN={run}", *SWEEP_SHORT], cwd=ROOT, capture_output=True,
                           text=True, env={**os.environ, "MAKEFLAGS": ""})
    assert again.returncode == 0 and "kd-distill" not in again.stdout and "kd-eval" not in again.stdout
