"""kd-eval's task metrics, kd-finetune, kd-chain and kd-report."""
import json

from conftest import run_bin, read_jsonl, write_jsonl


def test_eval_tasks_speed_csv_and_samples(trained_llama, held_out, tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", [
        {"id": "m0", "prompt": "The quick brown fox jumps over the", "choices": [" zebra quantum", " lazy dog."], "label": 1},
        {"id": "m1", "prompt": "It was the best of times, it was the", "choices": [" worst of times.", " purple ledger"], "label": 0},
    ])
    cloze = write_jsonl(tmp_path / "cloze.jsonl", [
        {"id": "c0", "prompt": "The quick brown fox jumps over the lazy", "completion": " dog"},
        {"id": "c1", "prompt": "It was the best of times, it was the worst of", "completion": " times"},
    ])
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"id": "g0", "prompt": "The quick brown", "completion": " fox jumps over the lazy dog."}])
    out, csv = tmp_path / "m.json", tmp_path / "all.csv"
    for name in ["first", "second"]:
        run_bin("kd-eval", "--model", trained_llama, "--teacher", trained_llama, "--data", held_out, "--mc", mc,
                "--cloze", cloze, "--generate", gen, "--samples-out", tmp_path / "samples.md", "--speed",
                "--speed-batch", 2, "--csv", csv, "--name", name, "--out", out, "--device", "cpu")
    m = json.loads(out.read_text())
    # The trained teacher knows its training sentences.
    assert m["mc_accuracy"] == 1.0 and m["cloze_accuracy"] == 1.0 and m["rouge_l"] > 0.5
    assert m["teacher_kl"] < 1e-6 and m["top1_agreement"] == 1.0
    assert m["latency_ms_per_token"] > 0 and m["throughput_tokens_per_s"] > 0 and m["peak_rss_bytes"] > 0
    assert m["params"] > 0 and m["bytes_on_disk"] > 0
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("name,model,params") and len(lines) == 3 and lines[2].startswith("second,")
    md = (tmp_path / "samples.md").read_text()
    assert "**Teacher:**" in md and "**Prompt:** The quick brown" in md


def test_finetune_uses_task_loss_and_lower_lr(trained_llama, tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", [{"id": f"t{i}", "prompt": "Q: colour of the sky? A:", "completion": " blue"}
                                                for i in range(8)])
    out = tmp_path / "ft"
    proc = run_bin("kd-finetune", "--model", trained_llama, "--data", task, "--out", out, "--steps", 30,
                   "--batch-size", 4, "--lr", 3e-3, "--device", "cpu")
    cfg = json.loads((out / "distill_config.json").read_text())
    assert cfg["beta"] == 0 and cfg["teacher"] is None and cfg["alpha"] == 1
    import csv as _csv
    rows = list(_csv.DictReader(open(out / "metrics.csv")))
    assert float(rows[-1]["ce"]) < 0.2 * float(rows[0]["ce"])
    assert float(rows[0]["kd"]) == 0.0
    help_text = run_bin("kd-finetune", "--help").stdout
    assert "[default: 0.0001]" in help_text  # smaller than kd-distill's 1e-3


def test_chain_runs_hops_and_resumes(trained_llama, held_out, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"x{i}", "text": t} for i, t in enumerate(
        ["The quick brown fox jumps over the lazy dog.", "It was the best of times, it was the worst of times."] * 3)])
    out = tmp_path / "chain"
    sizes = "layers=2,heads=2,kv-heads=1;layers=1,heads=2,kv-heads=1,intermediate=64"
    args = ["--teacher", trained_llama, "--sizes", sizes, "--data", data, "--out", out, "--steps", 4,
            "--eval-data", held_out, "--device", "cpu", "--distill-args", "--batch-size 2"]
    run_bin("kd-chain", *args)
    chain = json.loads((out / "chain.json").read_text())
    assert [h["hop"] for h in chain["hops"]] == [1, 2]
    assert chain["hops"][1]["teacher"] == str(out / "hop1" / "model")
    assert "teacher_kl" in chain["hops"][1]["metrics"]
    student = json.loads((out / "hop2" / "model" / "config.json").read_text())
    assert student["num_hidden_layers"] == 1 and student["intermediate_size"] == 64
    # Interrupted after hop 1: the rerun skips it and redoes hop 2 only.
    (out / "hop2" / "hop.json").unlink()
    again = run_bin("kd-chain", *args)
    assert "hop 1 already done" in again.stderr and "kd-distill" in again.stderr


def test_report_table_plot_and_verdict(tmp_path):
    metrics = []
    for name, params, ppl, kl in [("teacher", 4e6, 20.0, 0.0), ("distilled", 1e6, 30.0, 0.5), ("ce-baseline", 1e6, 33.0, 0.7)]:
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({"name": name, "params": params, "bytes_on_disk": params * 2, "perplexity": ppl, "teacher_kl": kl}))
        metrics.append(p)
    run_bin("kd-report", "--metrics", *metrics, "--out", tmp_path / "r", "--student", "distilled", "--baseline", "ce-baseline")
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.index("| teacher |") < md.index("| distilled |")
    # Without kd-eval's per-item sidecars nothing can be paired: no verdict is claimed.
    assert "held-out perplexity: distilled 30.0000 vs ce-baseline 33.0000; not tested: no per-item outcomes" in md
    assert "**better**" not in md and "**worse**" not in md
    svg = (tmp_path / "r" / "size_vs_quality.svg").read_text()
    assert svg.startswith("<svg") and "distilled" in svg and "perplexity" in svg
