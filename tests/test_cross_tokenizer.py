"""Students with their own tokenizer: kd-tokenizer, kd-init --tokenizer, kd-distill
--cross-tokenizer (ULD and GOLD against a PyTorch reference written here, with its own
alignment), exact resume, and kd-eval's bits per byte."""
import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny
from conftest import HELD_OUT, kill_after_checkpoint, run_bin, write_jsonl

# Unicode split across byte-level tokens, whitespace runs, tabs and blank lines.
EXTRA = [
    "naïve café — “quoted” 日本語のテキスト.",
    "tabs\t\tand   spaces\n\nnew  lines  end.",
    "Émigré señor, über straße: ½ ≠ ∞.",
]
TEXTS = sorted(set(tiny.CORPUS)) + EXTRA
PAIRS = [
    {"prompt": "The quick brown", "completion": " fox — jumps over   the lazy dog."},
    {"prompt": "A teacher model", "completion": " distills its knowledge: ½ café."},
]


def records():
    recs = [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)]
    return recs + [{"id": f"p{i}", **p} for i, p in enumerate(PAIRS)]


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("xtok")
    return write_jsonl(d / "train.jsonl", records())


@pytest.fixture(scope="module")
def student_tok(trained_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("xtok-tok")
    corpus = write_jsonl(d / "corpus.jsonl", [{"id": f"c{i}", "text": t} for i, t in enumerate(TEXTS * 5)])
    out = d / "tok"
    run_bin("kd-tokenizer", "--data", corpus, "--vocab-size", 290, "--out", out, "--like", trained_llama,
            "--min-frequency", 1)
    return out


@pytest.fixture(scope="module")
def student(trained_llama, student_tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("xtok-student") / "s"
    run_bin("kd-init", "--teacher", trained_llama, "--tokenizer", student_tok, "--out", out, "--layers", 2,
            "--heads", 2, "--kv-heads", 1, "--intermediate", 64, "--seed", 3, "--device", "cpu")
    return out


# ---- an independent reference: byte pieces, alignment and the two losses -------------------

def _byte_decoder():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTES = _byte_decoder()


def piece(tok, i):
    if i in tok.all_special_ids:
        return tok.convert_ids_to_tokens(i).encode()
    return bytes(BYTES[c] for c in tok.convert_ids_to_tokens(i))


def ends(tok, ids, text, offset):
    """Each token's end offset in bytes (None for a special the text does not contain)."""
    text = text.encode()
    pos, out = 0, []
    for i in ids:
        p = piece(tok, i)
        if i in tok.all_special_ids and not text[pos:].startswith(p):
            out.append(None)
            continue
        if not text[pos:].startswith(p):
            assert pos == 0 and p.startswith(b" ") and text.startswith(p[1:]), (p, text[pos:])
            p = p[1:]
        pos += len(p)
        out.append(offset + pos)
    assert pos == len(text)
    return out


def tokenize(tok, rec):
    if "text" in rec:
        ids = tok(rec["text"]).input_ids
        return ids, 1, ends(tok, ids, rec["text"], 0)
    p = tok(rec["prompt"]).input_ids
    c = tok(rec["completion"], add_special_tokens=False).input_ids
    return p + c, len(p), ends(tok, p, rec["prompt"], 0) + ends(tok, c, rec["completion"], len(rec["prompt"].encode()))


def groups(s_ends, t_ends):
    """Spans between the byte offsets where both tokenizations end a token."""
    common = sorted({e for e in s_ends if e is not None} & {e for e in t_ends if e is not None})
    out, prev = [], 0
    for b in common:
        s = [i for i, e in enumerate(s_ends) if e is not None and prev < e <= b]
        t = [j for j, e in enumerate(t_ends) if e is not None and prev < e <= b]
        out.append((s, t))
        prev = b
    return out


def merged(logits, rows, temperature):
    lp = (logits[rows] / temperature).log_softmax(-1)
    return lp.sum(0).log_softmax(-1)


def uld(p, q, k):
    a, b = p.sort(descending=True).values[:k], q.sort(descending=True).values[:k]
    a = torch.nn.functional.pad(a, (0, k - len(a)))
    b = torch.nn.functional.pad(b, (0, k - len(b)))
    return (a - b).abs().sum()


def vocab_match(s_tok, t_tok):
    t_by = {}
    for j in reversed(range(len(t_tok))):
        t_by[piece(t_tok, j)] = j
    s_m, t_m, used = [], [], set()
    for i in range(len(s_tok)):
        j = t_by.get(piece(s_tok, i))
        if j is not None and j not in used:
            used.add(j)
            s_m.append(i)
            t_m.append(j)
    s_u = [i for i in range(len(s_tok)) if i not in set(s_m)]
    t_u = [j for j in range(len(t_tok)) if j not in used]
    return s_m, t_m, s_u, t_u


@torch.no_grad()
def reference(teacher_dir, student_dir, recs, kind, temperature, k, divergence="forward-kl"):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    t_tok, s_tok = AutoTokenizer.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(student_dir)
    s_m, t_m, s_u, t_u = vocab_match(s_tok, t_tok)
    ce = kd = 0.0
    n = 0
    for rec in recs:
        s_ids, loss_from, s_ends = tokenize(s_tok, rec)
        t_ids, _, t_ends = tokenize(t_tok, rec)
        sl = student(torch.tensor([s_ids])).logits[0]
        tl = teacher(torch.tensor([t_ids])).logits[0]
        tgt = torch.tensor(s_ids[loss_from:])
        ce += torch.nn.functional.cross_entropy(sl[loss_from - 1:-1], tgt, reduction="sum").item()
        n += len(tgt)
        for s, t in groups(s_ends, t_ends):
            if min(s) < max(loss_from, 1) or min(t) < 1:
                continue
            ls = merged(sl, [i - 1 for i in s], temperature)
            lt = merged(tl, [j - 1 for j in t], temperature)
            if kind == "uld":
                loss = uld(ls.exp(), lt.exp(), k)
            else:
                a, b = ls[s_m], lt[t_m]
                a, b = a - a.logsumexp(-1), b - b.logsumexp(-1)
                if divergence == "forward-kl":
                    loss = (b.exp() * (b - a)).sum()
                else:
                    loss = (a.exp() * (a - b)).sum()
                loss = loss + uld(ls.exp()[s_u], lt.exp()[t_u], k)
            kd += loss.item() * temperature ** 2
    return ce / n, kd / n


# ---- tests ----------------------------------------------------------------------------------

def test_trained_tokenizer_round_trips_and_reloads_in_transformers(trained_llama, student_tok, student, tmp_path):
    tok = AutoTokenizer.from_pretrained(student_tok)
    like = AutoTokenizer.from_pretrained(trained_llama)
    assert len(tok) == 290
    assert tok.convert_ids_to_tokens([0, 1, 2]) == like.convert_ids_to_tokens([0, 1, 2]) == ["<s>", "</s>", "<pad>"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    for t in TEXTS + HELD_OUT:
        ids = tok(t).input_ids
        assert ids[0] == tok.bos_token_id, "the template's BOS was carried over"
        assert tok.decode(ids, skip_special_tokens=True) == t
    # The ids this project's stages use are transformers' ids: kd-generate records them.
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"q{i}", "prompt": t} for i, t in enumerate(EXTRA + HELD_OUT)])
    run_bin("kd-generate", "--teacher", student, "--prompts", prompts, "--out", tmp_path / "gen.jsonl",
            "--max-new-tokens", 1, "--device", "cpu")
    for line in open(tmp_path / "gen.jsonl"):
        r = json.loads(line)
        assert r["prompt_ids"] == tok(r["prompt"]).input_ids, r["prompt"]


def greedy(pieces, b):
    """Longest teacher pieces first, left to right (bytes that are no valid text)."""
    out, at = [], 0
    while at < len(b):
        l = max(l for l in range(1, len(b) - at + 1) if b[at:at + l] in pieces)
        out.append(pieces[b[at:at + l]])
        at += l
    return out


def test_embeddings_are_composed_from_the_teacher_rows(trained_llama, student_tok, tmp_path):
    out = tmp_path / "copy"
    run_bin("kd-init", "--teacher", trained_llama, "--tokenizer", student_tok, "--out", out, "--init", "copy-layers",
            "--device", "cpu")
    t_tok, s_tok = AutoTokenizer.from_pretrained(trained_llama), AutoTokenizer.from_pretrained(student_tok)
    tw, sw = load_file(f"{trained_llama}/model.safetensors"), load_file(out / "model.safetensors")
    kinds = {"special": 0, "exact": 0, "composed": 0, "bytes": 0}
    t_pieces = {}
    for j in reversed(range(len(t_tok))):
        if j not in t_tok.all_special_ids:
            t_pieces[piece(t_tok, j)] = j
    for name in ["model.embed_tokens.weight", "lm_head.weight"]:
        if name not in sw:
            continue
        assert sw[name].shape == (290, tw[name].shape[1])
        for i in range(len(s_tok)):
            p = piece(s_tok, i)
            if i in s_tok.all_special_ids:
                parts, kind = [t_tok.convert_tokens_to_ids(s_tok.convert_ids_to_tokens(i))], "special"
            else:
                try:
                    parts = t_tok(p.decode(), add_special_tokens=False).input_ids
                    assert b"".join(piece(t_tok, j) for j in parts) == p
                    kind = "exact" if len(parts) == 1 else "composed"
                except UnicodeDecodeError:
                    parts, kind = greedy(t_pieces, p), "bytes"
            want = tw[name][parts].mean(0)
            assert torch.allclose(sw[name][i], want, atol=1e-6), (name, i, s_tok.convert_ids_to_tokens(i), parts)
            kinds[kind] += 1
    assert all(v > 0 for v in kinds.values()), kinds
    report = json.loads((out / "distillery_init.json").read_text())["vocabulary"]
    assert report["tokens"] == 290 and report["random"] == 0
    assert report["embedding_params_after"] < report["embedding_params_before"]


@pytest.mark.parametrize("kind,divergence", [("uld", "forward-kl"), ("gold", "forward-kl"), ("gold", "reverse-kl")])
def test_first_step_loss_matches_the_reference(trained_llama, student, data, tmp_path, kind, divergence):
    recs = records()
    out = tmp_path / "run"
    run_bin("kd-distill", "--teacher", trained_llama, "--student", student, "--data", data, "--out", out,
            "--steps", 1, "--batch-size", len(recs), "--alpha", 0.3, "--beta", 0.7, "--temperature", 2.0,
            "--cross-tokenizer", kind, "--divergence", divergence, "--uld-top-k", 16, "--chunk", 5, "--device", "cpu")
    got = rows(out / "metrics.csv")[0]
    ce, kd = reference(trained_llama, str(student), recs, kind, 2.0, 16, divergence)
    assert abs(float(got["ce"]) - ce) <= 1e-4 * ce, (got["ce"], ce)
    assert abs(float(got["kd"]) - kd) <= 1e-4 * kd, (got["kd"], kd)
    assert abs(float(got["loss"]) - (0.3 * ce + 0.7 * kd)) <= 1e-4 * (0.3 * ce + 0.7 * kd)


STORED_K = 8


@pytest.fixture(scope="module")
def stored(trained_llama, tmp_path_factory):
    """A transfer set with the teacher's top-K rows stored (as a served teacher's would be)."""
    d = tmp_path_factory.mktemp("xtok-stored")
    prompts = [t[: len(t) // 3] for t in TEXTS] + [p["prompt"] for p in PAIRS]
    path = write_jsonl(d / "prompts.jsonl", [{"id": f"q{i}", "prompt": t} for i, t in enumerate(prompts)])
    gen = d / "transfer.jsonl"
    run_bin("kd-generate", "--teacher", trained_llama, "--prompts", path, "--out", gen, "--max-new-tokens", 12,
            "--temperature", 0, "--store-logits", STORED_K, "--device", "cpu")
    return gen, d / "transfer.jsonl.logits.safetensors"


@torch.no_grad()
def reference_stored(teacher_dir, student_dir, gen, sidecar, kind, temperature, k, k_stored=STORED_K):
    """As `reference`, with the teacher's rows taken from the sidecar (its stored ids, the
    tail mass spread evenly over the other tokens) instead of a forward pass."""
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    t_tok, s_tok = AutoTokenizer.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(student_dir)
    s_m, t_m, s_u, t_u = vocab_match(s_tok, t_tok)
    rows = load_file(sidecar)
    vocab = len(t_tok)
    ce = kd = 0.0
    n = 0
    for rec in map(json.loads, open(gen)):
        s_ids, loss_from, s_ends = tokenize(s_tok, rec)
        sl = student(torch.tensor([s_ids])).logits[0]
        tgt = torch.tensor(s_ids[loss_from:])
        ce += torch.nn.functional.cross_entropy(sl[loss_from - 1:-1], tgt, reduction="sum").item()
        n += len(tgt)
        p_ids, c_ids = rec["prompt_ids"], rec["completion_ids"]
        t_ends = [None] * (len(p_ids) - 1) + [len(rec["prompt"].encode())]
        t_ends += ends(t_tok, c_ids, rec["completion"], len(rec["prompt"].encode()))
        at = rec["teacher_logits"]["row"] - len(p_ids)
        idx, lp, tail = rows["indices"].long(), rows["logprobs"].float(), rows["tail_logmass"].float()
        for s, t in groups(s_ends, t_ends):
            if min(s) < loss_from or min(t) < len(p_ids):
                continue
            r = [at + j for j in t]
            full = (tail[r] - math.log(vocab - k_stored))[:, None].expand(len(r), vocab).clone().scatter(1, idx[r], lp[r])
            lt = (full / temperature).log_softmax(-1).sum(0).log_softmax(-1)
            ls = merged(sl, [i - 1 for i in s], temperature)
            if kind == "uld":
                loss = uld(ls.exp(), lt.exp(), k)
            else:
                a, b = ls[s_m], lt[t_m]
                a, b = a - a.logsumexp(-1), b - b.logsumexp(-1)
                loss = (b.exp() * (b - a)).sum() + uld(ls.exp()[s_u], lt.exp()[t_u], k)
            kd += loss.item() * temperature ** 2
    return ce / n, kd / n


@pytest.mark.parametrize("kind", ["uld", "gold"])
def test_stored_teacher_rows_across_tokenizers_match_the_reference(trained_llama, student, stored, tmp_path, kind):
    gen, sidecar = stored
    n = sum(1 for _ in open(gen))
    out = tmp_path / "run"
    # No teacher model: its stored rows and its tokenizer are all kd-distill reads of it.
    run_bin("kd-distill", "--teacher-logits", sidecar, "--teacher-tokenizer", trained_llama, "--student", student,
            "--data", gen, "--out", out, "--steps", 1, "--batch-size", n, "--alpha", 0.3, "--beta", 0.7,
            "--temperature", 2.0, "--cross-tokenizer", kind, "--uld-top-k", 16, "--chunk", 5, "--device", "cpu")
    got = rows(out / "metrics.csv")[0]
    ce, kd = reference_stored(trained_llama, str(student), gen, sidecar, kind, 2.0, 16)
    assert kd > 0
    assert abs(float(got["ce"]) - ce) <= 1e-4 * ce, (got["ce"], ce)
    assert abs(float(got["kd"]) - kd) <= 1e-4 * kd, (got["kd"], kd)


def test_cross_tokenizer_resume_is_bit_exact(trained_llama, student, data, tmp_path):
    args = ["--teacher", trained_llama, "--student", student, "--data", data, "--batch-size", 4, "--lr", 3e-3,
            "--seed", 1, "--device", "cpu", "--steps", 40, "--save-every", 3, "--grad-accum", 2,
            "--cross-tokenizer", "gold", "--divergence", "jsd"]
    run_bin("kd-distill", *args, "--out", tmp_path / "straight")
    interrupted = tmp_path / "interrupted"
    step = kill_after_checkpoint("kd-distill", args, interrupted, 3)
    resumed = run_bin("kd-distill", *args, "--out", interrupted, "--resume")
    assert f"resuming at step {step}" in resumed.stderr
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@torch.no_grad()
def _bits_per_byte(model_dir, texts):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    bits = nbytes = 0.0
    for t in texts:
        ids = torch.tensor([tok(t).input_ids])
        bits += torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="sum").item() / math.log(2)
        nbytes += len(t.encode())  # BOS first: every byte is predicted
    return bits / nbytes


def test_eval_reports_bits_per_byte_and_no_kl_across_vocabularies(trained_llama, student, tmp_path):
    texts = HELD_OUT + EXTRA
    held = write_jsonl(tmp_path / "held.jsonl", [{"id": f"h{i}", "text": t} for i, t in enumerate(texts)])
    for name, model in [("student", student), ("teacher", trained_llama)]:
        out = tmp_path / f"{name}.json"
        run_bin("kd-eval", "--model", model, "--teacher", trained_llama, "--data", held, "--out", out, "--device", "cpu")
        m = json.loads(out.read_text())
        want = _bits_per_byte(str(model), texts)
        assert abs(m["bits_per_byte"] - want) <= 1e-4 * want, (name, m["bits_per_byte"], want)
        assert m["bits_per_char"] > m["bits_per_byte"], "multi-byte characters: fewer characters than bytes"
        lo, hi = m["bits_per_byte_ci95"]
        assert lo < m["bits_per_byte"] < hi
        # Per record, the bytes its targets spell (BOS first: the whole text), for paired comparisons.
        items = json.loads((tmp_path / f"{name}.items.json").read_text())["records"]
        assert items["bytes"] == [len(t.encode()) for t in texts]
        if name == "student":
            assert "teacher_kl" not in m and "differs" in m["teacher_kl_note"]
        else:
            assert "teacher_kl" in m and "teacher_kl_note" not in m


def test_refusals_name_the_fix(trained_llama, student, data, tmp_path):
    p = run_bin("kd-distill", "--teacher", trained_llama, "--student", student, "--data", data, "--out", tmp_path / "a",
                "--steps", 1, "--device", "cpu", check=False)
    assert p.returncode != 0 and "--cross-tokenizer uld" in p.stderr
    p = run_bin("kd-distill", "--teacher", trained_llama, "--student", student, "--data", data, "--out", tmp_path / "b",
                "--steps", 1, "--cross-tokenizer", "uld", "--hidden-weight", 1, "--device", "cpu", check=False)
    assert p.returncode != 0 and "positions" in p.stderr
    p = run_bin("kd-distill", "--teacher-logits", tmp_path / "x.logits.safetensors", "--student", student, "--data", data,
                "--out", tmp_path / "c", "--steps", 1, "--cross-tokenizer", "gold", "--device", "cpu", check=False)
    assert p.returncode != 0 and "--teacher-tokenizer" in p.stderr
    p = run_bin("kd-tokenizer", "--data", data, "--vocab-size", 100, "--out", tmp_path / "t", check=False)
    assert p.returncode != 0 and "byte symbols" in p.stderr and not (tmp_path / "t").exists()
