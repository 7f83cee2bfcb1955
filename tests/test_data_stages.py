"""kd-filter and kd-augment: every selection rule and augmentation op, with exact outputs
on small inputs; generation batching and samples."""
import json

import pytest

from conftest import run_bin, read_jsonl, with_chat_template, write_jsonl

RECS = [
    {"id": "a", "text": "The quick brown fox jumps over the lazy dog."},
    {"id": "b", "text": "It was the best of times, it was the worst of times."},
    {"id": "c", "text": "The quick brown fox jumps over the lazy dog."},          # exact duplicate of a
    {"id": "d", "text": "The  quick brown fox jumps over the lazy dog!"},         # near duplicate of a
    {"id": "e", "text": "Zebra quantum 77 ## purple ledger."},
    {"id": "f", "prompt": "A teacher model", "completion": " distills its knowledge into a smaller student model.",
     "extra": {"kept": True}},
]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "in.jsonl", RECS)


def _filter(teacher, data, out, *flags, student=None):
    extra = ["--student", student] if student else []
    return run_bin("kd-filter", "--teacher", teacher, "--data", data, "--out", out, "--device", "cpu", *extra, *flags)


def _scores(path):
    return {r["id"]: r["scores"] for r in read_jsonl(path)}


def test_scores_and_exact_dedup(trained_llama, data, tmp_path):
    out = tmp_path / "out.jsonl"
    _filter(trained_llama, data, out, "--scored-out", tmp_path / "all.jsonl")
    kept = read_jsonl(out)
    assert [r["id"] for r in kept] == ["a", "b", "d", "e", "f"]
    assert kept[-1]["extra"] == {"kept": True}  # unknown fields pass through
    scores = _scores(tmp_path / "all.jsonl")
    assert set(scores["a"]) == {"teacher_logprob", "teacher_confidence", "teacher_entropy", "tokens"}
    # The trained teacher is surer of its training text than of gibberish.
    assert scores["a"]["teacher_confidence"] > scores["e"]["teacher_confidence"]
    assert scores["a"]["teacher_logprob"] > scores["e"]["teacher_logprob"]
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["removed"] == {"exact_duplicate": 1} and summary["kept"] == 5
    assert sum(summary["histograms"]["teacher_confidence"]["counts"]) == 6


def test_near_dedup(trained_llama, data, tmp_path):
    out = tmp_path / "out.jsonl"
    _filter(trained_llama, data, out, "--dedup", "near", "--near-threshold", "0.5")
    assert [r["id"] for r in read_jsonl(out)] == ["a", "b", "e", "f"]


def test_thresholds_fractions_and_lengths(trained_llama, data, tmp_path):
    _filter(trained_llama, data, tmp_path / "x.jsonl", "--dedup", "none", "--scored-out", tmp_path / "all.jsonl")
    s = _scores(tmp_path / "all.jsonl")
    conf = sorted(s, key=lambda k: -s[k]["teacher_confidence"])
    mid = (s[conf[2]]["teacher_confidence"] + s[conf[3]]["teacher_confidence"]) / 2
    out = tmp_path / "min.jsonl"
    _filter(trained_llama, data, out, "--dedup", "none", "--min", f"teacher_confidence={mid}")
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(conf[:3])
    out = tmp_path / "top.jsonl"
    _filter(trained_llama, data, out, "--dedup", "none", "--select", "teacher_confidence:bottom:0.5")
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(conf[3:])
    # Length limits count every token of a text record; its `tokens` score counts the predicted ones.
    texts = write_jsonl(tmp_path / "texts.jsonl", [r for r in RECS if "text" in r])
    tokens = {k: int(v["tokens"]) + 1 for k, v in s.items() if k != "f"}
    limit = sorted(tokens.values())[2]
    out = tmp_path / "len.jsonl"
    _filter(trained_llama, texts, out, "--dedup", "none", "--max-tokens", limit, "--min-tokens", 12)
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(k for k, t in tokens.items() if 12 <= t <= limit)


def test_hard_example_mixture_with_student(trained_llama, model_dirs, data, tmp_path):
    student = tmp_path / "student"
    run_bin("kd-init", "--teacher", trained_llama, "--out", student, "--layers", 1, "--device", "cpu")
    _filter(trained_llama, data, tmp_path / "x.jsonl", "--dedup", "none", "--scored-out", tmp_path / "all.jsonl",
            student=student)
    s = _scores(tmp_path / "all.jsonl")
    assert all("kl_teacher_student" in v and "ce_gap" in v for v in s.values())
    hard = sorted(s, key=lambda k: -s[k]["kl_teacher_student"])[:2]
    conf = sorted(s, key=lambda k: -s[k]["teacher_confidence"])[:3]
    out = tmp_path / "mix.jsonl"
    _filter(trained_llama, data, out, "--dedup", "none", "--select", "teacher_confidence:top:0.5",
            "--select", "kl_teacher_student:top:0.34", student=student)
    assert sorted(r["id"] for r in read_jsonl(out)) == sorted(set(hard) | set(conf))
    rec = read_jsonl(out)[0]
    assert len(rec["hard_tokens"]) == 3 and {"position", "token", "kl"} <= set(rec["hard_tokens"][0])


def test_filter_refusals(trained_llama, data, tmp_path):
    p = run_bin("kd-filter", "--teacher", trained_llama, "--data", data, "--out", tmp_path / "o.jsonl",
                "--select", "kl_teacher_student:top:0.3", check=False)
    assert p.returncode != 0 and "need --student" in p.stderr
    p = run_bin("kd-filter", "--teacher", trained_llama, "--data", data, "--out", tmp_path / "o.jsonl",
                "--min", "nonsense=1", check=False)
    assert p.returncode != 0 and "unknown score `nonsense`" in p.stderr
    assert not (tmp_path / "o.jsonl").exists()


WORDS = [{"id": "w", "text": "one two three four five six seven eight nine ten"}]


M64 = (1 << 64) - 1


class SplitMix64:
    """The documented stream (crates/distillery/src/rng.rs), reimplemented independently."""

    def __init__(self, seed, key):
        self.s = (seed ^ (key * 0xD6E8FEB86659FD93)) & M64
        self.next_u64()

    def next_u64(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & M64
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def f64(self):
        return (self.next_u64() >> 11) / float(1 << 53)

    def below(self, n):
        return int(self.f64() * n) % n


def expected_op(op, text, ratio, seed, rec=0, op_idx=0, k=0):
    """The documented algorithm of each word op (crates/distillery/src/augment.rs)."""
    rng = SplitMix64(seed, (rec << 24) ^ (op_idx << 16) ^ k)
    w = text.split()
    count = min(max(int(len(w) * ratio + 0.5), 1), len(w))
    if op == "delete":
        return " ".join(x for x in w if rng.f64() >= ratio)
    if op == "swap":
        for _ in range(count):
            a, b = rng.below(len(w)), rng.below(len(w))
            w[a], w[b] = w[b], w[a]
        return " ".join(w)
    start = rng.below(len(w) - count + 1)
    return " ".join(w[:start] + ["<mask>"] + w[start + count:])


@pytest.mark.parametrize("op", ["delete", "swap", "mask"])
@pytest.mark.parametrize("seed,ratio", [(3, 0.1), (8, 0.3)])
def test_word_ops_exact(op, seed, ratio, tmp_path):
    data = write_jsonl(tmp_path / "w.jsonl", WORDS)
    out = tmp_path / "aug.jsonl"
    run_bin("kd-augment", "--data", data, "--out", out, "--ops", op, "--ratio", ratio, "--seed", seed)
    expected = expected_op(op, WORDS[0]["text"], ratio, seed)
    assert expected != WORDS[0]["text"]
    recs = read_jsonl(out)
    assert recs[0] == WORDS[0]
    assert recs[1] == {"id": f"w#{op}0", "text": expected, "parent": "w", "source": f"augment:{op}"}


def test_word_ops_properties_and_counts(tmp_path):
    data = write_jsonl(tmp_path / "w.jsonl", WORDS * 1 + [{"id": "v", "prompt": "p", "completion": "a b c d e f"}])
    out = tmp_path / "aug.jsonl"
    run_bin("kd-augment", "--data", data, "--out", out, "--ops", "delete,swap,mask", "--per-record", 3,
            "--ratio", 0.3, "--seed", 1, "--no-originals")
    recs = read_jsonl(out)
    assert len(recs) == 2 * 3 * 3
    src = WORDS[0]["text"].split()
    for r in recs:
        if r["parent"] != "w":
            assert r["prompt"] == "p" and "completion" in r  # completion is what gets rewritten
            continue
        words = r["text"].split()
        if r["source"] == "augment:swap":
            assert sorted(words) == sorted(src)
        if r["source"] == "augment:delete":
            it = iter(src)
            assert all(w in it for w in words)  # a subsequence
        if r["source"] == "augment:mask":
            assert "<mask>" in words and len(words) == len(src) - 3 + 1
    again = tmp_path / "again.jsonl"
    run_bin("kd-augment", "--data", data, "--out", again, "--ops", "delete,swap,mask", "--per-record", 3,
            "--ratio", 0.3, "--seed", 1, "--no-originals")
    assert read_jsonl(again) == recs


def test_teacher_ops(trained_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "x", "text": "The quick brown fox jumps over the lazy dog."},
        {"id": "y", "prompt": "It was the best", "completion": " of times."},
    ])
    out = tmp_path / "aug.jsonl"
    run_bin("kd-augment", "--data", data, "--out", out, "--ops", "infill,paraphrase,backtranslate,resample",
            "--teacher", trained_llama, "--ratio", 0.3, "--max-new-tokens", 12, "--seed", 2, "--device", "cpu",
            "--no-originals", "--templates", "pipelines/templates/augment.json")
    recs = {r["id"]: r for r in read_jsonl(out)}
    inf = recs["x#infill0"]
    words = inf["text"].split()
    assert words[:1] == ["The"] and words[-2:] == ["lazy", "dog."] or len(words) >= 3
    assert recs["x#paraphrase0"]["source"] == "augment:paraphrase"
    assert recs["x#backtranslate0"]["parent"] == "x"
    # resample: one record per temperature for the prompt record; text records lack a prompt.
    assert {recs["y#resample0"]["teacher"]["temperature"], recs["y#resample1"]["teacher"]["temperature"]} == {0.7, 1.3}


def test_augment_refusals(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", WORDS)
    p = run_bin("kd-augment", "--data", data, "--out", tmp_path / "o.jsonl", "--ops", "infill", check=False)
    assert p.returncode != 0 and "need --teacher" in p.stderr
    p = run_bin("kd-augment", "--data", data, "--out", tmp_path / "o.jsonl", "--ops", "shuffle", check=False)
    assert p.returncode != 0 and "unknown op `shuffle`" in p.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_batched_generation_with_samples_equals_one_at_a_time(trained_llama, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in
                          enumerate(["The quick", "It was the best of", "A teacher", "In the beginning God"])])
    outs = []
    for batch in [1, 16]:
        out = tmp_path / f"b{batch}.jsonl"
        run_bin("kd-generate", "--teacher", trained_llama, "--prompts", prompts, "--out", out, "--samples", 3,
                "--temperature", 0.9, "--top-p", 0.95, "--seed", 11, "--max-new-tokens", 16, "--batch-size", batch,
                "--device", "cpu")
        outs.append(read_jsonl(out))
    assert outs[0] == outs[1]
    assert len(outs[0]) == 12


def test_stop_strings_end_completions(trained_llama, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "p", "prompt": "The quick brown"}])
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    run_bin("kd-generate", "--teacher", trained_llama, "--prompts", prompts, "--out", full, "--max-new-tokens", 20,
            "--device", "cpu")
    text = read_jsonl(full)[0]["completion"]
    stop = text.split()[2]  # a word in the middle of the greedy completion
    run_bin("kd-generate", "--teacher", trained_llama, "--prompts", prompts, "--out", cut, "--max-new-tokens", 20,
            "--stop", stop, "--device", "cpu")
    rec = read_jsonl(cut)[0]
    assert stop in rec["completion"] and len(rec["completion_ids"]) < len(read_jsonl(full)[0]["completion_ids"])
    # It stopped at the first token whose text completes the stop string.
    assert read_jsonl(full)[0]["completion_ids"][: len(rec["completion_ids"])] == rec["completion_ids"]


def test_chat_template_matches_transformers(trained_llama, tmp_path):
    from transformers import AutoTokenizer

    model = with_chat_template(trained_llama, tmp_path / "chat",
                               "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'].strip() }}"
                               "{% endfor %}{% if add_generation_prompt %} [ASSISTANT]{% endif %}")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "p", "prompt": "  The quick brown fox "}])
    out = tmp_path / "g.jsonl"
    run_bin("kd-generate", "--teacher", model, "--prompts", prompts, "--out", out, "--max-new-tokens", 4,
            "--chat-template", "--device", "cpu")
    tok = AutoTokenizer.from_pretrained(model)
    want = tok.apply_chat_template([{"role": "user", "content": "  The quick brown fox "}], add_generation_prompt=True,
                                   tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert read_jsonl(out)[0]["prompt_ids"] == list(want)
    p = run_bin("kd-generate", "--teacher", trained_llama, "--prompts", prompts, "--out", tmp_path / "x.jsonl",
                "--chat-template", "--device", "cpu", check=False)
    assert p.returncode != 0 and "has no chat template" in p.stderr


def test_scoring_mode_stores_logits_for_corpus_records(trained_llama, tmp_path):
    from safetensors.torch import load_file
    import torch

    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "t", "text": "The quick brown fox jumps over the lazy dog."},
                                              {"id": "q", "prompt": "It was the best", "completion": " of times."}])
    out = tmp_path / "scored.jsonl"
    run_bin("kd-generate", "--teacher", trained_llama, "--prompts", data, "--out", out, "--score", "--store-logits", 8,
            "--device", "cpu")
    recs = read_jsonl(out)
    assert recs[0]["text"].startswith("The quick") and len(recs[0]["prompt_ids"]) == 1
    stored = load_file(tmp_path / "scored.jsonl.logits.safetensors")
    n = sum(len(r["completion_ids"]) for r in recs)
    assert stored["indices"].shape == (n, 8) and stored["logprobs"].dtype == torch.float16
    # Row i holds the teacher's top-8 for predicting completion_ids[i]: compare with transformers.
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(trained_llama)
    ids = torch.tensor([recs[0]["prompt_ids"] + recs[0]["completion_ids"]])
    lp = m(ids).logits[0, :-1].log_softmax(-1)
    top, idx = lp.topk(8, -1)
    rows = recs[0]["teacher_logits"]
    assert torch.equal(stored["indices"][rows["row"]:rows["row"] + rows["rows"]].long(), idx)
    assert torch.allclose(stored["logprobs"][:rows["rows"]].float(), top, atol=2e-2)
    # And kd-distill trains from it offline.
    student = tmp_path / "s"
    run_bin("kd-init", "--teacher", trained_llama, "--out", student, "--layers", 1, "--device", "cpu")
    run_bin("kd-distill", "--student", student, "--data", out, "--out", tmp_path / "run", "--steps", 3, "--alpha", 0,
            "--beta", 1, "--teacher-logits", tmp_path / "scored.jsonl.logits.safetensors", "--batch-size", 2,
            "--device", "cpu")


def test_teacher_ops_exact_with_greedy_decoding(trained_llama, tmp_path):
    """Infill and paraphrase at temperature 0 equal transformers' greedy generate on the
    documented prompts (span from the documented stream; template from the file)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "It was the best of times, it was the worst of times."
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "text": text}])
    out = tmp_path / "aug.jsonl"
    seed, ratio, new = 4, 0.3, 10
    run_bin("kd-augment", "--data", data, "--out", out, "--ops", "infill,paraphrase", "--teacher", trained_llama,
            "--ratio", ratio, "--temperature", 0, "--max-new-tokens", new, "--seed", seed, "--no-originals",
            "--device", "cpu")
    got = {r["id"]: r["text"] for r in read_jsonl(out)}
    tok = AutoTokenizer.from_pretrained(trained_llama)
    model = AutoModelForCausalLM.from_pretrained(trained_llama)

    def greedy(prompt):
        ids = tok(prompt, return_tensors="pt").input_ids
        g = model.generate(ids, do_sample=False, max_new_tokens=new)[0, ids.shape[1]:]
        cut = []
        for t in g.tolist():
            cut.append(t)
            if t == tok.eos_token_id:
                break
        return tok.decode(cut, skip_special_tokens=True)

    # Infill (op 0): a span of round(ratio * (n - 1)) words starting after the first word.
    words = text.split()
    rng = SplitMix64(seed, (0 << 24) ^ (0 << 16) ^ 0)
    span = min(max(int((len(words) - 1) * ratio + 0.5), 1), len(words) - 1)
    start = rng.below(len(words) - 1 - span + 1) + 1
    prefix, suffix = " ".join(words[:start]), " ".join(words[start + span:])
    fill = greedy(prefix).split()[:span]
    assert got["x#infill0"] == " ".join(p for p in [prefix, " ".join(fill), suffix] if p)
    # Paraphrase (op 1): the first line of the greedy continuation of the filled template.
    template = json.load(open("pipelines/templates/augment.json"))["paraphrase"]
    lines = greedy(template.replace("{text}", text)).lstrip().splitlines()
    assert got["x#paraphrase0"] == (lines[0].strip() if lines else "")
