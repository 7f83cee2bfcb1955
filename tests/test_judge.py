"""The judge (kd-eval --judge, --pairwise) and targeted sets (kd-eval --targeted) against
references written here: the SQuAD evaluation script's exact match and F1, and a Python
reimplementation of the pairwise bookkeeping on the judge's own log-probabilities computed
by transformers from the chat template as transformers renders it."""
import collections
import json
import re
import string

import pytest

from conftest import ROOT, read_jsonl, run_bin, with_chat_template, write_jsonl

# A ChatML-style template with a system turn, as instruction models have.
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEMPLATE = json.loads((ROOT / "pipelines" / "templates" / "judge.json").read_text())


# The SQuAD v2.0 evaluation script's answer normalisation, exact match and F1.
def normalize_answer(s):
    def remove_articles(text):
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def get_tokens(s):
    return normalize_answer(s).split() if s else []


def compute_exact(a_gold, a_pred):
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold, a_pred):
    gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def contains(gold, pred):
    g, p = get_tokens(gold), get_tokens(pred)
    if not g:
        return int(not p)
    return int(any(p[i:i + len(g)] == g for i in range(len(p) - len(g) + 1)))


@pytest.fixture(scope="module")
def chat_model(trained_llama, tmp_path_factory):
    return with_chat_template(trained_llama, tmp_path_factory.mktemp("judge") / "chat", CHAT)


QUESTIONS = ["What does the teacher model do?", "Who jumps over the lazy dog?", "When was it the best of times?",
             "What does a student learn from?", "Name a number.", "What is knowledge distillation?",
             "What did God create?", "Which symbols appear in text?"]


def judge_logprobs(model_dir, texts, labels, reply):
    """transformers' log-probabilities of each label (its first token, or its whole sequence
    where the first tokens coincide) after each judge prompt
    (system turn, user turn, generation prompt, then the start of the reply the template
    writes for the judge), and the prompt lengths."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    start = tok.encode(reply, add_special_tokens=False)
    seqs = [tok.encode(f"{reply} {label}", add_special_tokens=False)[len(start):] for label in labels]
    common = 0  # the tokens every label begins with (a lone space here) are written for the judge
    while all(len(q) > common and q[common] == seqs[0][common] for q in seqs):
        common += 1
    start += seqs[0][:common]
    tails = [q[common:] for q in seqs]
    # Distinct first tokens are read alone; otherwise each label's whole sequence is scored.
    whole = len({t[0] for t in tails}) < len(tails)
    out = []
    for text in texts:
        msgs = [{"role": "system", "content": TEMPLATE["system"]}, {"role": "user", "content": text}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids) + start
        if whole:
            scores = []
            for t in tails:
                with torch.no_grad():
                    lp = model(torch.tensor([ids + t])).logits[0, len(ids) - 1:-1].log_softmax(-1)
                scores.append(sum(lp[j, x].item() for j, x in enumerate(t)))
            out.append((scores, len(ids)))
            continue
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        out.append(([lp[t[0]].item() for t in tails], len(ids)))
    return out


def fill(template, **values):
    out = template
    for k, v in values.items():
        out = out.replace("{" + k + "}", v)
    return out


def test_targeted_scores_match_squad_reference(trained_llama, tmp_path):
    prompts = [{"id": f"q{i}", "prompt": q} for i, q in enumerate(QUESTIONS)]
    # First the model's greedy answers; then references built from them, so that exact
    # match, F1 and contains take every value, not only 0.
    first = tmp_path / "first.json"
    answers = tmp_path / "answers.jsonl"
    run_bin("kd-eval", "--model", trained_llama, "--targeted",
            write_jsonl(tmp_path / "p.jsonl", [{**p, "answer": "x"} for p in prompts]),
            "--out", first, "--max-new-tokens", 12, "--answers-out", answers, "--device", "cpu")
    outs = {r["id"]: r["output"] for r in read_jsonl(answers)}
    recs = []
    for i, p in enumerate(prompts):
        o = outs[p["id"]]
        words = o.split()
        variants = [
            {"answer": o.upper() + "!"},                                     # exact after normalisation
            {"answers": ["zzz qqq", " ".join(words[:2])]},                   # a prefix: contains, partial F1
            {"answer": "The " + " ".join(words[1:3]) + ", an"},              # articles and punctuation
            {"answers": ["unrelated words entirely"]},                       # nothing in common
            {"answer": " ".join(reversed(words))},                           # same words, other order
            {"answer": "."},                                                 # normalises to nothing
            {"answers": [words[-1] if words else "", o + " extra words"]},
            {"reference": o + " and a longer tail of reference text"},       # long: ROUGE-L only
        ]
        recs.append({**p, **variants[i % len(variants)], "category": "even" if i % 2 == 0 else "odd"})
    data = write_jsonl(tmp_path / "t.jsonl", recs)
    out = tmp_path / "m.json"
    run_bin("kd-eval", "--model", trained_llama, "--targeted", data, "--out", out, "--max-new-tokens", 12, "--device", "cpu")
    m = json.loads(out.read_text())
    items = {r["id"]: r for r in json.loads((tmp_path / "m.items.json").read_text())["targeted"]}
    ems, f1s, cs = [], [], []
    for r in recs:
        it = items[r["id"]]
        assert it["output"] == outs[r["id"]], "greedy answers are deterministic"
        golds = r.get("answers") or ([r["answer"]] if "answer" in r else None)
        if golds is None:
            assert "exact_match" not in it and it["rouge_l"] >= 0
            continue
        em = max(compute_exact(g, it["output"]) for g in golds)
        f1 = max(compute_f1(g, it["output"]) for g in golds)
        c = max(contains(g, it["output"]) for g in golds)
        assert it["exact_match"] == em and it["f1"] == pytest.approx(f1, abs=1e-12) and it["contains_answer"] == c, (r, it)
        ems.append(em), f1s.append(f1), cs.append(c)
    assert 0 < sum(ems) < len(ems) and 0 < sum(f1s) < len(f1s), "the references exercise both outcomes"
    assert m["targeted_exact_match"] == pytest.approx(sum(ems) / len(ems))
    assert m["targeted_f1"] == pytest.approx(sum(f1s) / len(f1s))
    assert m["targeted_contains_answer"] == pytest.approx(sum(cs) / len(cs))
    lo, hi = m["targeted_f1_ci95"]
    assert lo <= m["targeted_f1"] <= hi
    assert set(m["targeted_exact_match_by_category"]) == {"even", "odd"}
    assert m["targeted_reference_rouge_l_items"] == 1


def test_pairwise_bookkeeping_matches_python(chat_model, trained_llama, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": q} for i, q in enumerate(QUESTIONS)])
    # Side A: answers a model gives (kd-eval --answers-out); side B: a file of other answers.
    a_file = tmp_path / "a.jsonl"
    run_bin("kd-eval", "--model", chat_model, "--targeted", prompts, "--out", tmp_path / "a.json", "--chat-template",
            "--max-new-tokens", 8, "--answers-out", a_file, "--device", "cpu")
    b_answers = ["The student learns.", "The quick brown fox.", "It was the best of times.", "Soft targets.",
                 "12345", "The teacher distills knowledge.", "The heaven and the earth.", "#, % and &."]
    b_file = write_jsonl(tmp_path / "b.jsonl", [{"id": f"q{i}", "output": b} for i, b in enumerate(b_answers)])
    out = tmp_path / "pair.json"
    samples = tmp_path / "pair.md"
    p = run_bin("kd-eval", "--pairwise", chat_model, b_file, "--pairwise-names", "model", "written", "--judge", chat_model,
                "--prompts", prompts, "--chat-template", "--max-new-tokens", 8, "--out", out, "--samples-out", samples,
                "--judge-raw-tokens", 4, "--device", "cpu")
    assert "judged by" in p.stdout + p.stderr
    m = json.loads(out.read_text())
    rows = json.loads((tmp_path / "pair.items.json").read_text())["pairwise"]
    a_answers = {r["id"]: r["output"].strip() for r in read_jsonl(a_file)}
    labels = [TEMPLATE["pairwise_labels"][k] for k in ("a", "b", "tie")]
    texts = []
    for i, q in enumerate(QUESTIONS):
        a, b = a_answers[f"q{i}"], b_answers[i]
        assert rows[i]["answer_a"] == a and rows[i]["answer_b"] == b
        texts.append(fill(TEMPLATE["pairwise"], question=q, answer_a=a, answer_b=b))
        texts.append(fill(TEMPLATE["pairwise"], question=q, answer_a=b, answer_b=a))
    readings = judge_logprobs(chat_model, texts, labels, TEMPLATE["pairwise_reply"])
    counts = collections.Counter()
    consistent = first = 0
    for i, row in enumerate(rows):
        winners = []
        for o, (lps, n) in zip(row["orders"], readings[2 * i: 2 * i + 2]):
            got = [o["logprobs"][label] for label in labels]
            assert got == pytest.approx(lps, abs=1e-4) and o["prompt_tokens"] == n
            best = max(range(3), key=lambda j: (lps[j], j))  # exact ties read as the later label
            first += best == 0
            a_first = o["shown_first"] == "a"
            winners.append({0: "a" if a_first else "b", 1: "b" if a_first else "a"}.get(best, "tie"))
            assert o["winner"] == winners[-1]
        combined = winners[0] if winners[0] == winners[1] else "tie"
        assert row["winner"] == combined and row["consistent"] == (winners[0] == winners[1])
        counts[combined] += 1
        consistent += winners[0] == winners[1]
    n = len(QUESTIONS)
    assert (m["wins_a"], m["wins_b"], m["ties"]) == (counts["a"], counts["b"], counts["tie"])
    assert m["score_a"] == pytest.approx((counts["a"] + 0.5 * counts["tie"]) / n)
    assert m["self_agreement"] == pytest.approx(consistent / n)
    assert m["first_position_rate"] == pytest.approx(first / (2 * n))
    lo, hi = m["win_rate_a_ci95"]
    assert lo <= m["win_rate_a"] <= hi
    assert (m["a"], m["b"], m["items"]) == ("model", "written", n)
    md = samples.read_text()
    assert md.count("**Judge:**") == n and "written" in md
    # The report: the targeted table and the judge's row with its verdict.
    run_bin("kd-report", "--metrics", tmp_path / "a.json", "--targeted", tmp_path / "a.json", "--judgements", out,
            "--out", tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Targeted set" in report and "## Judged answers, pairwise" in report
    row = next(line for line in report.splitlines() if line.startswith("| model | written |"))
    assert f"| {n} | {counts['a']} (" in row and f"| {counts['b']} (" in row and f"| {counts['tie']} (" in row
    assert any(v in row for v in ("**better**", "**worse**", "**no significant difference**"))


def test_judge_grades_against_references(chat_model, tmp_path):
    recs = [{"id": "r0", "prompt": QUESTIONS[0], "answer": "It distills knowledge."},
            {"id": "r1", "prompt": QUESTIONS[1], "answers": ["The quick brown fox", "a fox"]},
            {"id": "r2", "prompt": QUESTIONS[5], "reference": "The student learns from soft targets of the teacher."},
            {"id": "r3", "prompt": QUESTIONS[4]}]  # no reference: not graded
    data = write_jsonl(tmp_path / "t.jsonl", recs)
    out = tmp_path / "g.json"
    run_bin("kd-eval", "--model", chat_model, "--targeted", data, "--judge", chat_model, "--chat-template",
            "--max-new-tokens", 8, "--out", out, "--device", "cpu")
    m = json.loads(out.read_text())
    items = json.loads((tmp_path / "g.items.json").read_text())["targeted"]
    labels = [TEMPLATE["grade_labels"][k] for k in ("correct", "partial", "wrong")]
    refs = ["It distills knowledge.", "The quick brown fox / a fox", "The student learns from soft targets of the teacher."]
    texts = [fill(TEMPLATE["grade"], question=recs[i]["prompt"], reference=refs[i], answer=items[i]["output"]) for i in range(3)]
    scores = []
    for it, (lps, n) in zip(items, judge_logprobs(chat_model, texts, labels, TEMPLATE["grade_reply"])):
        assert it["judge_logprobs"] == pytest.approx(lps, abs=1e-4) and it["judge_prompt_tokens"] == n
        best = max(range(3), key=lambda j: (lps[j], j))
        assert it["judge_grade"] == ["correct", "partial", "wrong"][best]
        scores.append([1.0, 0.5, 0.0][best])
    assert "judge_grade" not in items[3]
    assert m["targeted_judge_grade"] == pytest.approx(sum(scores) / 3) and m["targeted_judge_grade_items"] == 3
    assert sum(m["judge_grade_counts"].values()) == 3


def test_judge_input_errors_are_named(chat_model, trained_llama, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "q0", "prompt": "Hi?"}, {"id": "q1", "prompt": "Bye?"}])
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "q0", "output": "x"}, {"id": "q1", "output": "y"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "q0", "output": "z"}])
    out = tmp_path / "o.json"
    base = ["--prompts", prompts, "--out", out, "--device", "cpu"]
    p = run_bin("kd-eval", "--pairwise", a, b, "--judge", chat_model, *base, check=False)
    assert p.returncode != 0 and "no answer for prompt q1" in p.stderr and "b.jsonl" in p.stderr
    p = run_bin("kd-eval", "--pairwise", a, a, "--judge", chat_model, *base, check=False)
    assert p.returncode != 0 and "--pairwise-names" in p.stderr
    p = run_bin("kd-eval", "--pairwise", a, b, "--judge", trained_llama, *base, check=False)
    assert p.returncode != 0 and "no chat template" in p.stderr
    same = dict(TEMPLATE, pairwise_labels={"a": "A", "b": "tie", "tie": "tie"})
    bad = tmp_path / "same.json"
    bad.write_text(json.dumps(same))
    p = run_bin("kd-eval", "--pairwise", a, b, "--judge", chat_model, "--judge-template", bad, *base, check=False)
    assert p.returncode != 0 and "could not tell them apart" in p.stderr and "same.json" in p.stderr
    missing = dict(TEMPLATE, grade=TEMPLATE["grade"].replace("{reference}", "the reference"))
    bad.write_text(json.dumps(missing))
    p = run_bin("kd-eval", "--pairwise", a, b, "--judge", chat_model, "--judge-template", bad, *base, check=False)
    assert p.returncode != 0 and "{reference}" in p.stderr
    dup = write_jsonl(tmp_path / "d.jsonl", [{"id": "q0", "prompt": "Hi?"}, {"id": "q0", "prompt": "Again?"}])
    p = run_bin("kd-eval", "--model", trained_llama, "--targeted", dup, "--out", out, "--device", "cpu", check=False)
    assert p.returncode != 0 and "duplicate id `q0`" in p.stderr
    assert not out.exists()
