"""kd-eval's 95% intervals and per-item sidecar, kd-report's paired tests, curves, HTML page
and reproducibility card; the statistics are checked against scipy and statsmodels computed
here."""
import hashlib
import json
import math
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

import tiny
from conftest import ROOT, run_bin, write_jsonl

B = 4000  # bootstrap resamples asked of the binaries here (the default is 1000)


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalin")
    rng = np.random.default_rng(0)
    words = sorted({w for t in tiny.CORPUS for w in t.split()})
    texts = [" ".join(rng.choice(words, size=int(rng.integers(4, 30)))) for _ in range(60)]
    data = write_jsonl(d / "data.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)])
    mc = write_jsonl(d / "mc.jsonl", [
        {"id": f"m{i}", "prompt": " ".join(rng.choice(words, size=6)), "choices": [" " + w for w in rng.choice(words, size=3)],
         "label": int(rng.integers(0, 3))} for i in range(80)])
    cloze = write_jsonl(d / "cloze.jsonl", [{"id": f"c{i}", "prompt": t.rsplit(" ", 1)[0], "completion": " " + t.rsplit(" ", 1)[1]}
                                            for i, t in enumerate(texts[:30])])
    gen = write_jsonl(d / "gen.jsonl", [{"id": f"g{i}", "prompt": t.split(" ", 3)[0], "completion": t} for i, t in enumerate(texts[:4])])
    return data, mc, cloze, gen


def evaluate(model, teacher, inputs, out, name, strategy):
    data, mc, cloze, gen = inputs
    run_bin("kd-eval", "--model", model, "--teacher", teacher, "--data", data, "--mc", mc, "--cloze", cloze, "--generate", gen,
            "--max-new-tokens", 6, "--speed", "--speed-repeats", 3, "--name", name, "--strategy", strategy,
            "--bootstrap-samples", B, "--out", out, "--device", "cpu")
    return json.loads(out.read_text()), json.loads(out.with_name(out.stem + ".items.json").read_text())


def test_eval_intervals_match_scipy_and_statsmodels(trained_llama, model_dirs, eval_inputs, tmp_path):
    m, items = evaluate(model_dirs["llama"], trained_llama, eval_inputs, tmp_path / "m.json", "random", "init")
    rec = items["records"]
    nll, tok, kl = map(np.array, (rec["nll"], rec["tokens"], rec["kl"]))
    # The sidecar sums back to the headline figures.
    assert m["tokens"] == tok.sum() and len(rec["ids"]) == m["records"] == 60
    assert math.isclose(m["perplexity"], math.exp(nll.sum() / tok.sum()), rel_tol=1e-9)
    assert math.isclose(m["teacher_kl"], kl.sum() / tok.sum(), rel_tol=1e-9)
    # Percentile bootstrap over records of a ratio of sums (scipy, 20000 resamples).
    for key, num, f in [("perplexity", nll, np.exp), ("teacher_kl", kl, lambda x: x)]:
        ref = sps.bootstrap((num, tok), lambda a, b: f(a.sum() / b.sum()), paired=True, vectorized=False, n_resamples=20000,
                            method="percentile", random_state=1).confidence_interval
        lo, hi = m[f"{key}_ci95"]
        assert lo < m[key] < hi
        width = ref.high - ref.low
        assert abs(lo - ref.low) < 0.08 * width and abs(hi - ref.high) < 0.08 * width, (key, lo, hi, ref)
    # Wilson intervals of the accuracies, exactly as statsmodels and scipy give them.
    for key, task in [("mc_accuracy", "mc"), ("cloze_accuracy", "cloze")]:
        correct = items[task]["correct"]
        k, n = sum(correct), len(correct)
        assert math.isclose(m[key], k / n)
        ref = proportion_confint(k, n, alpha=0.05, method="wilson")
        assert np.allclose(m[f"{key}_ci95"], ref, atol=1e-9), (key, m[f"{key}_ci95"], ref)
        sp = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert np.allclose(m[f"{key}_ci95"], [sp.low, sp.high], atol=1e-9)
    # Speed: warm-up, then repeated rounds; the median lies within their range.
    lat = m["latency_ms_per_token_samples"]
    assert len(lat) == m["speed_repeats"] == 3 and m["latency_ms_per_token"] == float(np.median(lat))
    assert m["latency_ms_per_token_range"] == [min(lat), max(lat)]
    assert m["strategy"] == "init" and m["shape"].startswith("llama layers=")
    assert [g["id"] for g in items["generations"]] == ["g0", "g1", "g2", "g3"]


def fake_eval(d, name, params, correct, nll, tokens, kl, strategy=None, seed=None, latency=None, shape="s"):
    """A kd-eval metrics file and sidecar with chosen per-item outcomes."""
    nll, tokens, kl = map(np.asarray, (nll, tokens, kl))
    m = {"name": name, "params": params, "bytes_on_disk": 4 * params, "perplexity": float(np.exp(nll.sum() / tokens.sum())),
         "teacher_kl": float(kl.sum() / tokens.sum()), "mc_accuracy": float(np.mean(correct)), "strategy": strategy,
         "train_seed": seed, "shape": shape, "device": "cpu", "items_file": f"{name}.items.json"}
    if latency is not None:
        m["latency_ms_per_token"] = float(np.median(latency))
        m["latency_ms_per_token_samples"] = list(latency)
    (d / f"{name}.json").write_text(json.dumps(m))
    ids = [f"r{i}" for i in range(len(nll))]
    (d / f"{name}.items.json").write_text(json.dumps({
        "records": {"ids": ids, "tokens": tokens.tolist(), "nll": nll.tolist(), "kl": kl.tolist()},
        "mc": {"ids": [f"m{i}" for i in range(len(correct))], "correct": [bool(c) for c in correct]},
        "generations": [{"id": "g0", "prompt": "In the beginning", "output": f"{name} says hello", "reference": "x"}]}))
    return d / f"{name}.json"


def paired_ppl_ci(nll_a, nll_b, tok, n=20000, seed=2):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(tok), size=(n, len(tok)))
    d = np.exp(nll_a[idx].sum(1) / tok[idx].sum(1)) - np.exp(nll_b[idx].sum(1) / tok[idx].sum(1))
    return np.percentile(d, [2.5, 97.5])


def test_report_paired_tests_against_statsmodels(tmp_path):
    rng = np.random.default_rng(0)
    n_rec, n_mc = 200, 200
    tok = rng.integers(20, 200, size=n_rec).astype(float)
    base_nll = tok * rng.normal(3.9, 0.3, size=n_rec)
    # "student" beats "baseline" on perplexity by a margin far outside the noise; "twin" is the
    # baseline plus noise only; both pairs are judged on the same records.
    student_nll = base_nll - tok * rng.normal(0.15, 0.05, size=n_rec)
    twin_nll = base_nll + tok * rng.normal(0.0, 0.05, size=n_rec)
    # The case: 33.0% against 34.5% of 200 items, with 25 and 22 discordant pairs.
    base_mc = np.zeros(n_mc, bool)
    base_mc[:69] = True
    student_mc = base_mc.copy()
    student_mc[:25] = False
    student_mc[69:91] = True
    assert student_mc.sum() == 66
    kl = tok * 0.4
    files = [fake_eval(tmp_path, "baseline", 1e6, base_mc, base_nll, tok, kl, "ce", 0),
             fake_eval(tmp_path, "student", 1e6, student_mc, student_nll, tok, kl * 0.8, "kd", 0),
             fake_eval(tmp_path, "twin", 1e6, base_mc, twin_nll, tok, kl, "kd-cos", 0)]
    out = tmp_path / "r"
    run_bin("kd-report", "--metrics", *files, "--out", out, "--student", "student", "--baseline", "baseline",
            "--baseline-strategy", "ce", "--bootstrap-samples", B)
    md = (out / "report.md").read_text()
    section = md.split("## Distilled student against the baseline")[1].split("\n## ")[0]
    # McNemar: statsmodels' exact p over the 2x2 table of paired outcomes.
    table = [[np.sum(student_mc & base_mc), np.sum(student_mc & ~base_mc)], [np.sum(~student_mc & base_mc), np.sum(~student_mc & ~base_mc)]]
    p = mcnemar(table, exact=True).pvalue
    line = next(l for l in section.splitlines() if l.startswith("* multiple-choice accuracy"))
    assert f"McNemar exact p = {p:.3f}" in line and "**no significant difference**" in line, line
    # Perplexity: the paired bootstrap interval agrees with numpy's, and excludes zero.
    line = next(l for l in section.splitlines() if l.startswith("* held-out perplexity"))
    lo, hi = map(float, re.search(r"95% interval \[([-+0-9.]+), ([-+0-9.]+)\]", line).groups())
    ref = paired_ppl_ci(student_nll, base_nll, tok)
    width = ref[1] - ref[0]
    assert abs(lo - ref[0]) < 0.08 * width and abs(hi - ref[1]) < 0.08 * width, (lo, hi, ref)
    assert hi < 0 and "**better**" in line, line
    line = next(l for l in section.splitlines() if l.startswith("* held-out KL"))
    assert "**better**" in line
    # The sweep's table: the twin is within noise of the baseline on perplexity.
    twin = next(l for l in md.splitlines() if l.startswith("| twin | baseline |"))
    cells = [c.strip() for c in twin.strip("|").split("|")]
    tlo, thi = paired_ppl_ci(twin_nll, base_nll, tok)
    assert ("no significant difference" in cells[2]) == (tlo <= 0 <= thi), (cells[2], tlo, thi)
    assert "p = 1.000: **no significant difference**" in cells[4]


def svg_texts(svg):
    return [t.strip() for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg)]


def png_size_and_pixels(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    return w, h, zlib.decompress(idat)


def sweep_like(tmp_path):
    """Three sizes x two strategies x two seeds, and a teacher."""
    rng = np.random.default_rng(1)
    tok = rng.integers(20, 200, size=50).astype(float)
    files = [fake_eval(tmp_path, "teacher", 3_950_848, rng.random(100) < 0.33, tok * 3.68, tok, tok * 0, "teacher", None,
                       [0.9, 1.0, 1.1], shape="big")]
    for params, ppl in [(1_893_696, 41.3), (893_568, 48.0), (481_680, 58.2)]:
        for strategy, worse in [("ce", 1.08), ("kd", 1.0)]:
            for seed in [0, 1]:
                nll = tok * math.log(ppl * worse * (1 + 0.01 * seed))
                files.append(fake_eval(tmp_path, f"{strategy}-{params}-s{seed}", params, rng.random(100) < 0.3, nll, tok,
                                       tok * 0.3 * worse, strategy, seed, [0.3 + 0.2 * seed + params / 4e6, 0.35, 0.4],
                                       shape=f"shape{params}"))
    return files


def test_report_curves_ticks_png_and_pooled_speed(tmp_path):
    files = sweep_like(tmp_path)
    out = tmp_path / "r"
    run_bin("kd-report", "--metrics", *files, "--out", out, "--baseline-strategy", "ce")
    svg = (out / "size_vs_quality.svg").read_text()
    texts = svg_texts(svg)
    # Tick labels enclose the data on both axes: parameters 0.48M-3.95M, perplexity 41.3-67.5.
    params = [float(t[:-1]) for t in texts if re.fullmatch(r"[0-9.]+M", t)]
    assert min(params) <= 0.4817 and max(params) >= 3.9508, params
    ppl = [float(t) for t in texts if re.fullmatch(r"[0-9]+", t) and float(t) >= 10]
    assert len(set(ppl)) >= 4 and min(ppl) <= 39.6 and max(ppl) >= 58.2 * 1.08 * 1.01, ppl
    acc = [float(t[:-1]) for t in texts if re.fullmatch(r"[0-9.]+%", t)]
    mc = [100 * json.loads(f.read_text())["mc_accuracy"] for f in files]
    assert len(set(acc)) >= 3 and min(acc) <= min(mc) and max(acc) >= max(mc), (acc, mc)
    for label in ["ce", "kd", "teacher", "Pareto frontier", "parameters (log scale)", "bytes on disk (log scale)",
                  "ms/token at batch 1 (log scale)", "held-out perplexity (log scale)", "KL from the teacher"]:
        assert label in texts, label
    w, h, pixels = png_size_and_pixels(out / "size_vs_quality.png")
    assert (w, h) == tuple(map(int, re.search(r'width="(\d+)" height="(\d+)"', svg).groups()))
    assert len(set(pixels)) > 20  # text and lines were drawn, not a blank canvas
    md = (out / "report.md").read_text()
    # Two seeds of one shape: one pooled speed figure (median of all their rounds) for both.
    main = md.split("\n## ")[0]  # the table of every model
    rows = {l.split("|")[1].strip(): l for l in main.splitlines() if l.startswith("| ce-") or l.startswith("| kd-")}
    a0, a1 = 0.3 + 893_568 / 4e6, 0.5 + 893_568 / 4e6
    pooled = np.median([a0, 0.35, 0.4] * 2 + [a1, 0.35, 0.4] * 2)  # ce and kd, seeds 0 and 1
    cell = lambda name: rows[name].split("|")[13].strip()
    assert cell("ce-893568-s0") == cell("kd-893568-s1") and "4 of ce-893568-s0's shape" in cell("kd-893568-s1")
    assert cell("ce-893568-s0").startswith(f"{pooled:.2f}")
    assert "## Strategies by size, over seeds" in md and "## Paired verdicts against `ce`" in md
    assert "## Reproducibility card" in md


def test_html_report_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    files = sweep_like(tmp_path)
    out = tmp_path / "r"
    run_bin("kd-report", "--metrics", *files, "--out", out, "--baseline-strategy", "ce", "--html")
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                           "--dump-dom", (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    # The table, the plot (inline SVG with its axes) and the side-by-side samples, on one page.
    assert "<table>" in dom and "<td>ce-893568-s0</td>" in dom
    assert "<svg" in dom and "parameters (log scale)" in dom
    assert "Samples, side by side" in dom and "kd-481680-s1 says hello" in dom and "teacher says hello" in dom
    assert "Reproducibility card" in dom


def test_command_log_and_card(trained_llama, eval_inputs, tmp_path):
    log = tmp_path / "commands.jsonl"
    env = {"KD_COMMAND_LOG": str(log)}
    data = eval_inputs[0]
    out = tmp_path / "e.json"
    run_bin("kd-eval", "--model", trained_llama, "--data", data, "--out", out, "--name", "m", "--device", "cpu", env=env)
    failed = run_bin("kd-eval", "--model", trained_llama, "--data", tmp_path / "missing.jsonl", "--out", out, "--device", "cpu",
                     env=env, check=False)
    assert failed.returncode == 1
    envfile = tmp_path / "env.json"
    envfile.write_text(subprocess.run([sys.executable, str(ROOT / "scripts" / "environment.py")],
                                      capture_output=True, text=True, check=True).stdout)
    run_bin("kd-report", "--metrics", out, "--out", tmp_path / "r", "--commands", log, "--environment", envfile, env=env)
    recs = [json.loads(l) for l in log.read_text().splitlines()]
    assert [r["stage"] for r in recs] == ["kd-eval", "kd-eval", "kd-report"] and [r["ok"] for r in recs] == [True, False, True]
    assert recs[0]["argv"][1:3] == ["--model", str(trained_llama)] and recs[0]["tch"] != "unknown"
    md = (tmp_path / "r" / "report.md").read_text()
    card = md.split("## Reproducibility card")[1]
    weights = hashlib.sha256((Path(trained_llama) / "model.safetensors").read_bytes()).hexdigest()
    assert weights in card and hashlib.sha256(data.read_bytes()).hexdigest() in card
    assert "missing.jsonl" not in card  # the failed run is not on the card
    assert f"--model {trained_llama}" in card and "transformers " in card and "tch 0.24" in card
