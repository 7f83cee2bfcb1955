"""Pins kd-eval's and kd-filter's numbers against independent transformers computations:
teacher KL, top-1 agreement and teacher perplexity with a model that is not the teacher;
kd-filter's per-record scores and hard tokens; multiple-choice accuracy (raw and
byte-normalised), cloze accuracy and ROUGE-L, each on items where the plausible
alternative rules give a different answer."""
import json
import math
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny
from conftest import read_jsonl, run_bin, write_jsonl

# Logits are computed in fp32 on both sides; sums of log-probabilities agree to ~1e-6.
REL = 2e-5
# Two candidate tokens whose logits are closer than this may be ranked either way.
TIE = 1e-4


@pytest.fixture(scope="module")
def perturbed_llama(trained_llama, tmp_path_factory):
    """trained_llama with noise on every weight: it mostly agrees with its source, not always."""
    out = tmp_path_factory.mktemp("pin") / "perturbed"
    shutil.copytree(trained_llama, out)
    model = AutoModelForCausalLM.from_pretrained(trained_llama, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def random_qwen2(trained_llama, tmp_path_factory):
    """A random qwen2 (tied embeddings) on the same tokenizer: a teacher of another architecture."""
    out = tiny.make_model("qwen2", str(tmp_path_factory.mktemp("pin") / "qwen2"), seed=3, std=0.1)
    with open(f"{out}/tokenizer.json") as a, open(f"{trained_llama}/tokenizer.json") as b:
        assert json.load(a)["model"] == json.load(b)["model"], "tiny tokenizers differ between builds"
    return out


_LOADED = {}


def _load(model_dir):
    if model_dir not in _LOADED:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        _LOADED[model_dir] = (model, AutoTokenizer.from_pretrained(model_dir))
    return _LOADED[model_dir]


@torch.no_grad()
def _logp(model_dir, ids):
    """`[len(ids), vocab]` float64 log-probabilities of the next token at every position."""
    model, _ = _load(model_dir)
    return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def _enc(tok, text, special):
    return tok(text, add_special_tokens=special).input_ids


def _decode(tok, ids, skip_special):
    return tok.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)


def _close(got, want, rel=REL, abs_=1e-6):
    return math.isclose(got, want, rel_tol=rel, abs_tol=abs_)


def _runner_up_margin(lp):
    """Per position, the gap between the two most likely tokens."""
    top = lp.topk(2, -1).values
    return top[:, 0] - top[:, 1]


# ---------------------------------------------------------------------------------------------
# kd-eval --data with --teacher: every predicted token of the whole text, special tokens included

EVAL_RECORDS = [
    {"id": "t0", "text": "The student model learns from the teacher model."},
    {"id": "t1", "text": "It was the worst of times, it was the best of times."},
    {"id": "t2", "text": "Zebra quantum 77 ## purple ledger, and the lazy dog."},
    {"id": "t3", "text": "In the beginning God created the heaven and the earth."},
    # Prompt + completion are joined as strings before tokenizing: "bro" + "wn" is one word.
    {"id": "pc", "prompt": "The quick bro", "completion": "wn fox jumps over the lazy dog."},
    {"id": "p", "prompt": "Numbers like 12345 and 2026 appear in text."},
    # Stored ids alone are taken as they are.
    {"id": "ids", "prompt_ids": [0, 291, 81, 90], "completion_ids": [223, 76, 289, 82, 85]},
    # With a text, stored ids are ignored.
    {"id": "both", "text": "A teacher model distills its knowledge.", "prompt_ids": [0, 5], "completion_ids": [6, 7]},
    # A single token (just BOS) predicts nothing: not counted as a record.
    {"id": "empty", "text": ""},
]


def _eval_ids(tok, rec):
    if "text" not in rec and "prompt" not in rec:
        return rec["prompt_ids"] + rec["completion_ids"]
    return _enc(tok, rec.get("text", rec.get("prompt", "") + rec.get("completion", "")), True)


def reference_eval(model_dir, teacher_dir, records):
    _, tok = _load(model_dir)
    nll = t_nll = kl = agree = 0.0
    count = n_records = ambiguous = 0
    for rec in records:
        ids = _eval_ids(tok, rec)
        if len(ids) < 2:
            continue
        n_records += 1
        tgt = torch.tensor(ids[1:])[:, None]
        ls, lt = _logp(model_dir, ids)[:-1], _logp(teacher_dir, ids)[:-1]
        nll -= ls.gather(1, tgt).sum().item()
        t_nll -= lt.gather(1, tgt).sum().item()
        kl += (lt.exp() * (lt - ls)).sum().item()
        agree += (lt.argmax(-1) == ls.argmax(-1)).sum().item()
        ambiguous += ((_runner_up_margin(ls) < TIE) | (_runner_up_margin(lt) < TIE)).sum().item()
        count += len(ids) - 1
    return {
        "records": n_records, "tokens": count, "nll": nll / count, "perplexity": math.exp(nll / count),
        "teacher_kl": kl / count, "top1_agreement": agree / count, "teacher_perplexity": math.exp(t_nll / count),
        "ambiguous": ambiguous,
    }


@pytest.mark.parametrize("pair", ["perturbed_vs_llama", "llama_vs_qwen2"])
def test_eval_against_a_different_teacher(pair, trained_llama, perturbed_llama, random_qwen2, tmp_path):
    model, teacher = {
        "perturbed_vs_llama": (perturbed_llama, trained_llama),
        "llama_vs_qwen2": (trained_llama, random_qwen2),
    }[pair]
    _, tok = _load(model)
    # The cases above mean what they say with this tokenizer.
    assert _enc(tok, "The quick brown fox jumps over the lazy dog.", True) != (
        _enc(tok, "The quick bro", True) + _enc(tok, "wn fox jumps over the lazy dog.", False))
    assert _enc(tok, EVAL_RECORDS[7]["text"], True)[:2] != [0, 5]
    data = write_jsonl(tmp_path / "d.jsonl", EVAL_RECORDS)
    out = tmp_path / "m.json"
    # Batches of 3: right padding inside batches of mixed lengths.
    run_bin("kd-eval", "--model", model, "--teacher", teacher, "--data", data, "--out", out, "--batch-size", 3,
            "--device", "cpu")
    got = json.loads(out.read_text())
    want = reference_eval(model, teacher, EVAL_RECORDS)
    assert got["records"] == want["records"] == len(EVAL_RECORDS) - 1
    assert got["tokens"] == want["tokens"]
    for k in ["nll", "perplexity", "teacher_perplexity", "teacher_kl"]:
        assert _close(got[k], want[k]), (k, got[k], want[k])
    assert abs(got["top1_agreement"] - want["top1_agreement"]) <= want["ambiguous"] / want["tokens"] + 1e-12
    # The pair is a real test of KL and agreement: neither trivially 0 nor 1.
    assert want["teacher_kl"] > 0.01 and 0.0 < want["top1_agreement"] < 1.0
    assert want["perplexity"] != pytest.approx(want["teacher_perplexity"], rel=1e-3)


def test_eval_max_length_truncates_before_scoring(trained_llama, perturbed_llama, tmp_path):
    recs = EVAL_RECORDS[:5]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    out = tmp_path / "m.json"
    run_bin("kd-eval", "--model", perturbed_llama, "--teacher", trained_llama, "--data", data, "--out", out,
            "--max-length", 6, "--device", "cpu")
    got = json.loads(out.read_text())
    _, tok = _load(perturbed_llama)
    cut = [{"id": r["id"], "prompt_ids": _eval_ids(tok, r)[:6], "completion_ids": []} for r in recs]
    want = reference_eval(perturbed_llama, trained_llama, cut)
    assert got["tokens"] == want["tokens"] == 5 * len(recs)
    for k in ["nll", "teacher_kl", "teacher_perplexity"]:
        assert _close(got[k], want[k]), (k, got[k], want[k])


# ---------------------------------------------------------------------------------------------
# kd-filter scores: mean over completion tokens (prompt masked; a text's first token is its prompt)

FILTER_RECORDS = [
    {"id": "a", "text": "The quick brown fox jumps over the lazy dog."},
    {"id": "b", "text": "It was the best of times, it was the worst of times."},
    {"id": "e", "text": "Zebra quantum 77 ## purple ledger."},
    # Prompt and completion are tokenized apart (prompt with special tokens, completion without).
    {"id": "pc", "prompt": "The quick bro", "completion": "wn fox jumps over the lazy dog."},
    {"id": "pc2", "prompt": "A teacher model", "completion": " distills its knowledge into a smaller student model."},
    # Stored ids win over the text.
    {"id": "ids", "prompt": "In the beginning", "completion": " God created the heaven.",
     "prompt_ids": [0, 291, 81, 90], "completion_ids": [223, 76, 289, 82, 85, 268, 88]},
]


def _filter_ids(tok, rec):
    if "prompt_ids" in rec:
        return rec["prompt_ids"] + rec["completion_ids"], len(rec["prompt_ids"])
    if "text" in rec:
        return _enc(tok, rec["text"], True), 1
    p = _enc(tok, rec["prompt"], True)
    return p + _enc(tok, rec["completion"], False), len(p)


def reference_scores(teacher_dir, student_dir, rec, max_length, worst_k):
    _, tok = _load(teacher_dir)
    ids, start = _filter_ids(tok, rec)
    ids = ids[:max_length]
    tgt = torch.tensor(ids[start:])[:, None]
    lt = _logp(teacher_dir, ids)[start - 1:-1]
    ls = _logp(student_dir, ids)[start - 1:-1]
    pt = lt.exp()
    t_lp = lt.gather(1, tgt).mean().item()
    kl = (pt * (lt - ls)).sum(-1)
    order = sorted(range(len(kl)), key=lambda i: -kl[i].item())
    return {
        "tokens": len(ids) - start,
        "teacher_logprob": t_lp,
        "teacher_confidence": pt.max(-1).values.mean().item(),
        "teacher_entropy": -(pt * lt).sum(-1).mean().item(),
        "kl_teacher_student": kl.mean().item(),
        "ce_gap": -ls.gather(1, tgt).mean().item() + t_lp,
    }, [(start + i, kl[i].item(), _decode(tok, [ids[start + i]], False)) for i in order], ids


@pytest.mark.parametrize("max_length", [None, 16])
def test_filter_scores_and_hard_tokens(max_length, trained_llama, perturbed_llama, tmp_path):
    _, tok = _load(trained_llama)
    a, _ = _filter_ids(tok, FILTER_RECORDS[0])
    pc, pc_from = _filter_ids(tok, FILTER_RECORDS[3])
    assert pc != a and pc_from < 16  # the split changes the tokens; truncation keeps some completion
    data = write_jsonl(tmp_path / "d.jsonl", FILTER_RECORDS)
    worst_k = 4
    extra = ["--max-length", max_length] if max_length else []
    run_bin("kd-filter", "--teacher", trained_llama, "--student", perturbed_llama, "--data", data,
            "--out", tmp_path / "o.jsonl", "--scored-out", tmp_path / "all.jsonl", "--dedup", "none",
            "--worst-tokens", worst_k, "--batch-size", 4, "--device", "cpu", *extra)
    got = {r["id"]: r for r in read_jsonl(tmp_path / "all.jsonl")}
    assert list(got) == [r["id"] for r in FILTER_RECORDS]
    for rec in FILTER_RECORDS:
        want, worst, ids = reference_scores(trained_llama, perturbed_llama, rec, max_length or 512, worst_k)
        scores = got[rec["id"]]["scores"]
        assert set(scores) == set(want), rec["id"]
        assert scores["tokens"] == want["tokens"], rec["id"]
        for k, v in want.items():
            assert _close(scores[k], v, abs_=2e-6), (rec["id"], k, scores[k], v)
        hard = got[rec["id"]]["hard_tokens"]
        assert len(hard) == min(worst_k, want["tokens"])
        by_pos = {p: (kl, t) for p, kl, t in worst}
        for h in hard:
            kl, text = by_pos[h["position"]]  # a completion position of the record
            assert _close(h["kl"], kl, abs_=2e-6) and h["token"] == text, (rec["id"], h, kl, text)
        # The k largest KLs, largest first (where the reference ranks them clearly).
        kls = [kl for _, kl, _ in worst]
        for i, h in enumerate(hard):
            clear = all(abs(kls[i] - kls[j]) > TIE for j in range(len(kls)) if j != i)
            if clear:
                assert h["position"] == worst[i][0], (rec["id"], i, hard, worst[:worst_k + 1])
    # Scores are per completion token: the masked prompt does not count.
    assert got["pc"]["scores"]["tokens"] == min(len(pc), max_length or 512) - pc_from


# ---------------------------------------------------------------------------------------------
# Multiple choice: summed log-likelihood of each choice after the prompt; _norm divides it by
# the choice's length in UTF-8 bytes

MC_ITEMS = [
    ("The quick brown fox jumps over the", [" lazy dog.", " lazy", " lazy dog. It was the best of times.", " dog"]),
    ("It was the best of times, it was the", [" worst of times.", " worst", " best", " worst of times, as do symbols"]),
    ("In the beginning God created the", [" heaven and the earth.", " heaven", " earth", " student"]),
    ("Knowledge distillation trains the", [" student on soft targets from the teacher.", " student", " teacher"]),
    ("Numbers like", [" 12345 and 2026 appear in text.", " 12345", " 2026", " café"]),
    # Bytes and characters differ here: " dög" is 5 bytes but 4 characters.
    ("The quick brown fox jumps over the", [" purple", " dög"]),
    ("Numbers like", [" purple", " ñ"]),
    ("Zebra", [" dög", " purple", " naïve"]),
]


def _choice_logprobs(model_dir, prompt, choices):
    _, tok = _load(model_dir)
    ctx = _enc(tok, prompt, True)
    out = []
    for ch in choices:
        cont = _enc(tok, ch, False)
        lp = _logp(model_dir, ctx + cont)
        out.append((sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)), len(cont)))
    return out


def _argmax(xs):
    return max(range(len(xs)), key=lambda i: xs[i])


def test_mc_accuracy_raw_and_byte_normalised(trained_llama, tmp_path):
    rules = {
        "raw": lambda lp, n, ch: lp,
        "bytes": lambda lp, n, ch: lp / max(len(ch.encode("utf-8")), 1),
        "chars": lambda lp, n, ch: lp / max(len(ch), 1),
        "tokens": lambda lp, n, ch: lp / max(n, 1),
    }
    picks = {k: [] for k in rules}
    for prompt, choices in MC_ITEMS:
        lps = _choice_logprobs(trained_llama, prompt, choices)
        for k, f in rules.items():
            picks[k].append(_argmax([f(lp, n, ch) for (lp, n), ch in zip(lps, choices)]))
    # Labels: the byte-normalised picks, so acc_norm is 1 and each other rule falls short of it.
    labels = picks["bytes"]
    acc = {k: sum(p == l for p, l in zip(v, labels)) / len(labels) for k, v in picks.items()}
    assert acc["bytes"] == 1.0 and max(acc["raw"], acc["chars"], acc["tokens"]) < 1.0, acc
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"id": f"m{i}", "prompt": p, "choices": c, "label": l}
                                             for i, ((p, c), l) in enumerate(zip(MC_ITEMS, labels))])
    out = tmp_path / "m.json"
    run_bin("kd-eval", "--model", trained_llama, "--mc", mc, "--out", out, "--batch-size", 5, "--device", "cpu")
    got = json.loads(out.read_text())
    assert got["mc_items"] == len(MC_ITEMS)
    assert got["mc_accuracy"] == acc["raw"] and got["mc_accuracy_norm"] == acc["bytes"], (got, acc)


# ---------------------------------------------------------------------------------------------
# Cloze: a hit when greedy decoding reproduces every token of the completion (tokenized alone)

CLOZE_PROMPTS = [
    "It was the best of times, it was the worst of",
    "Numbers like",
    "The quick brown",
    "A teacher",
    "In the beginning God",
    "Knowledge",
]


@torch.no_grad()
def _greedy(model_dir, ids, new, eos=()):
    """Plain greedy decoding with a KV cache; stops after a token in `eos` (none: never)."""
    model, _ = _load(model_dir)
    res = model(torch.tensor([ids]), use_cache=True)
    out = []
    for _ in range(new):
        t = res.logits[0, -1].argmax().item()
        out.append(t)
        if t in eos:
            break
        res = model(torch.tensor([[t]]), cache=res.cache, use_cache=True)
    return out


def test_cloze_needs_every_token(trained_llama, tmp_path):
    _, tok = _load(trained_llama)
    items = []
    for i, p in enumerate(CLOZE_PROMPTS):
        g = _greedy(trained_llama, _enc(tok, p, True), 4)
        first = _decode(tok, g[:1], False)
        items.append({"id": f"c{i}", "prompt": p, "completion": _decode(tok, g[:2], False)})  # the greedy text
        items.append({"id": f"c{i}x", "prompt": p, "completion": first + "zq"})  # its first token only
        if len(first) >= 2:  # the text is a prefix of the greedy text, its tokens are not
            items.append({"id": f"c{i}p", "prompt": p, "completion": first[:-1]})
    hits, text_hits, first_hits = [], [], []
    for it in items:
        want = _enc(tok, it["completion"], False)
        g = _greedy(trained_llama, _enc(tok, it["prompt"], True), len(want))
        hits.append(g == want)
        text_hits.append(_decode(tok, g, False).startswith(it["completion"]))
        first_hits.append(g[:1] == want[:1])
    acc = sum(hits) / len(items)
    # Neither all nor none; a text-level or first-token rule would score differently.
    assert 0 < acc < 1 and sum(text_hits) != sum(hits) and sum(first_hits) != sum(hits), (hits, text_hits, first_hits)
    cloze = write_jsonl(tmp_path / "c.jsonl", items)
    out = tmp_path / "m.json"
    run_bin("kd-eval", "--model", trained_llama, "--cloze", cloze, "--out", out, "--batch-size", 5, "--device", "cpu")
    got = json.loads(out.read_text())
    assert got["cloze_items"] == len(items) and got["cloze_accuracy"] == acc, (got, hits)


# ---------------------------------------------------------------------------------------------
# ROUGE-L: F1 of the longest common subsequence of lower-cased whitespace-separated words


def rouge_l(candidate, reference):
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def test_reference_rouge_l_hand_values():
    assert rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)
    assert rouge_l("A b", "a B c") == pytest.approx(0.8)  # P 1, R 2/3
    assert rouge_l("x y", "") == 0.0 and rouge_l("x", "y") == 0.0
    assert rouge_l("one two three four", "zero one two five three") == pytest.approx(2 * 0.75 * 0.6 / 1.35)


GEN_PROMPTS = ["The quick brown", "It was the best of times, it was the worst of", "Zebra quantum", "Numbers like",
               "In the beginning God"]


def _samples(md, label):
    return [m.group(1) for m in re.finditer(rf"^\*\*{re.escape(label)}:\*\* (.*)$", md, re.M)]


def test_rouge_l_and_samples_of_greedy_generations(trained_llama, perturbed_llama, tmp_path):
    _, tok = _load(trained_llama)
    new = 14
    eos = {tok.eos_token_id}

    def complete(model_dir, p):
        return _decode(tok, _greedy(model_dir, _enc(tok, p, True), new, eos), True)

    outs = [complete(trained_llama, p) for p in GEN_PROMPTS]
    w = [o.split() for o in outs]
    assert all(len(x) >= 3 for x in w), outs
    # References built from each generation so that the scores spread over (0, 1].
    refs = [
        outs[0],                                              # identical: 1
        " ".join(x.upper() for x in w[1][:2]) + " never " + " ".join(w[1][2:]),  # case-blind, one word in
        " ".join(reversed(w[2])),                             # order matters
        "nothing in common here",                             # 0
        None,                                                 # no reference completion: 0
    ]
    want = [rouge_l(o, r or "") for o, r in zip(outs, refs)]
    assert want[0] == 1.0 and want[3] == 0.0 and all(0 < x < 1 for x in want[1:3]), want
    items = [{"id": f"g{i}", "prompt": p, **({"completion": r} if r is not None else {})}
             for i, (p, r) in enumerate(zip(GEN_PROMPTS, refs))]
    gen = write_jsonl(tmp_path / "g.jsonl", items)
    out, md = tmp_path / "m.json", tmp_path / "samples.md"
    run_bin("kd-eval", "--model", trained_llama, "--teacher", perturbed_llama, "--generate", gen,
            "--max-new-tokens", new, "--samples-out", md, "--name", "student", "--batch-size", 3, "--out", out,
            "--device", "cpu")
    got = json.loads(out.read_text())
    text = md.read_text()
    assert _samples(text, "student") == [o.strip() for o in outs]
    assert _samples(text, "Teacher") == [complete(perturbed_llama, p).strip() for p in GEN_PROMPTS]
    assert got["gen_items"] == len(items)
    assert got["rouge_l"] == pytest.approx(sum(want) / len(want), abs=1e-12), (got["rouge_l"], want)
