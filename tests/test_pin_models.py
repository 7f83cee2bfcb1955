"""Pins, against references computed here with transformers/PyTorch: kd-generate's sampling
filters, kd-init's copy-layers and pruning choices, stored top-K teacher logits, and
perplexity on bf16 and sharded checkpoints."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import reference
import tiny
from conftest import TEXTS, read_jsonl, run_bin, write_jsonl

# ---------------------------------------------------------------------------------------
# 1. Sampling: temperature, top-k and top-p against transformers' logits warpers.
# ---------------------------------------------------------------------------------------

SAMPLES = 4000
SEED = 5

# (prompt, temperature, top_k, top_p) on the trained tiny llama, whose next-token
# distributions after these prompts have a few likely tokens. Each filter cuts: the kept
# support is 3 or 4 tokens of 300. The temperature matters in each (the draws do not fit the
# untempered distribution); in the last setting the order matters too (top-p applied before
# top-k keeps another set of tokens).
SETTINGS = {
    "temperature+top_k": ("and", 1.3, 4, None),
    "temperature+top_p": ("of", 0.7, None, 0.8),
    "temperature+top_k+top_p": ("and", 1.3, 4, 0.7),
}


@torch.no_grad()
def _next_token_scores(model_dir, prompt):
    model, tok = reference.load(model_dir)
    ids = tok(prompt, add_special_tokens=True, return_tensors="pt").input_ids
    return ids, model(ids).logits[:, -1].float()


def _warp(ids, scores, warpers):
    for w in warpers:
        scores = w(ids, scores)
    return scores


def _warpers(temperature, top_k, top_p):
    """transformers' sampling warpers in the order `generate` applies them."""
    out = [TemperatureLogitsWarper(temperature)]
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p:
        out.append(TopPLogitsWarper(top_p))
    return out


def _support(scores):
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


@pytest.fixture(scope="module")
def one_token_samples(trained_llama, tmp_path_factory):
    """Per setting: the prompt ids, the SAMPLES sampled tokens (in sample order),
    transformers' warped scores and the raw next-token logits. kd-generate runs once per
    setting."""
    root = tmp_path_factory.mktemp("sampling")
    out = {}
    for name, (prompt, temperature, top_k, top_p) in SETTINGS.items():
        data = write_jsonl(root / f"{name}.in.jsonl", [{"id": "p", "prompt": prompt}])
        gen = root / f"{name}.jsonl"
        flags = ["--temperature", temperature]
        flags += ["--top-k", top_k] if top_k else []
        flags += ["--top-p", top_p] if top_p else []
        run_bin("kd-generate", "--teacher", trained_llama, "--prompts", data, "--out", gen, "--max-new-tokens", 1,
                "--samples", SAMPLES, "--seed", SEED, "--batch-size", 1000, "--device", "cpu", *flags)
        recs = read_jsonl(gen)
        ids, scores = _next_token_scores(trained_llama, prompt)
        assert [r["id"] for r in recs] == [f"p#s{s}" for s in range(SAMPLES)]
        assert all(r["prompt_ids"] == ids[0].tolist() for r in recs)
        assert all(len(r["completion_ids"]) == 1 for r in recs)
        warped = _warp(ids, scores, _warpers(temperature, top_k, top_p))
        out[name] = (ids, [r["completion_ids"][0] for r in recs], warped, scores)
    return out


def test_top_k_1_sampling_equals_greedy(model_dirs, tmp_path):
    """At temperature 1, top-k 1 leaves one token per step: the greedy one."""
    prompts = ["The quick brown", "A teacher model distills its knowledge into", "It", "Numbers like 12"]
    data = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)])
    runs = {}
    for name, flags in [("greedy", ["--temperature", 0]), ("top1", ["--temperature", 1, "--top-k", 1]),
                        ("free", ["--temperature", 1])]:
        run_bin("kd-generate", "--teacher", model_dirs["llama"], "--prompts", data, "--out", tmp_path / f"{name}.jsonl",
                "--max-new-tokens", 12, "--samples", 2, "--seed", 9, "--device", "cpu", *flags)
        runs[name] = [r["completion_ids"] for r in read_jsonl(tmp_path / f"{name}.jsonl")]
    expected = [ids for ids in reference.greedy(model_dirs["llama"], prompts, 12) for _ in range(2)]
    assert runs["top1"] == expected
    assert runs["greedy"] == expected
    assert runs["free"] != expected  # sampling is really on at temperature 1 (flat random model)


def _chi_square_p_value(counts, probs):
    n = counts.sum()
    expected = n * probs
    stat = ((counts - expected) ** 2 / expected).sum()
    df = len(probs) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2).item()


def _misfit(tokens, warped):
    """Why `tokens` are not SAMPLES draws from softmax(warped), or None when they fit:
    every token drawn lies in the support, every member expected at least 100 times is drawn
    (P(missing it) < e^-100), and the frequencies are within 5 binomial standard deviations
    of the probabilities each, with a chi-square goodness-of-fit p-value above 1e-4."""
    support = _support(warped)
    if not set(tokens) <= support:
        return f"tokens outside the support: {set(tokens) - support}"
    probs = warped[0].double().softmax(-1)
    keys = sorted(support)
    p = probs[keys]
    frequent = {k for k, pk in zip(keys, p.tolist()) if pk * SAMPLES >= 100}
    if not frequent <= set(tokens):
        return f"support members never drawn: {frequent - set(tokens)}"
    counts = torch.tensor([tokens.count(k) for k in keys], dtype=torch.float64)
    freq = counts / SAMPLES
    std = (p * (1 - p) / SAMPLES).sqrt()
    if not ((freq - p).abs() <= 5 * std).all():
        return f"frequencies {freq.tolist()} against probabilities {p.tolist()}"
    if _chi_square_p_value(counts, p) <= 1e-4:
        return f"chi-square p-value {_chi_square_p_value(counts, p)}: {freq.tolist()} against {p.tolist()}"
    return None


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_tokens_follow_transformers_warpers(name, one_token_samples):
    """SAMPLES one-token draws from one prompt (fixed seed, so deterministic) against
    transformers' warped distribution: support and frequencies."""
    ids, tokens, warped, raw = one_token_samples[name]
    _, temperature, top_k, top_p = SETTINGS[name]
    support = _support(warped)
    assert 2 <= len(support) <= 6  # the filters cut (300 tokens without them)
    probs = warped[0].double().softmax(-1)
    assert min(probs[sorted(support)]) * SAMPLES >= 100  # so every member must be drawn
    assert set(tokens) == support
    assert _misfit(tokens, warped) is None, _misfit(tokens, warped)
    # The check can tell: the same draws do not fit the distribution without the
    # temperature, nor (with both filters) with top-p applied before top-k.
    filters = _warpers(temperature, top_k, top_p)[1:]
    assert _misfit(tokens, _warp(ids, raw, filters)) is not None
    if top_k and top_p:
        swapped = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p), TopKLogitsWarper(top_k)]
        assert _support(_warp(ids, raw, swapped)) != support


M64 = (1 << 64) - 1


def _stream_uniform(seed, key):
    """First `next_f64` of SplitMix64::for_key(seed, key) (the library's seeded stream)."""
    s = (seed ^ (key * 0xD6E8FEB86659FD93)) & M64
    out = None
    for _ in range(2):  # for_key discards one value
        s = (s + 0x9E3779B97F4A7C15) & M64
        z = s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out = z ^ (z >> 31)
    return (out >> 11) / float(1 << 53)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_tokens_follow_the_seeded_stream(name, one_token_samples):
    """Sample s of record 0 draws u from stream key (0 << 20 | s) and takes the first token
    (in vocabulary order) whose cumulative warped probability exceeds u: pins the exact
    samples, not only their distribution. Draws within 1e-5 of a CDF step are skipped
    (fp32 cumsum rounding)."""
    _, tokens, warped, _ = one_token_samples[name]
    cdf = warped[0].double().softmax(-1).cumsum(0)
    cdf = cdf / cdf[-1]
    steps = cdf[torch.isfinite(warped[0])]
    checked = 0
    for s, tok in enumerate(tokens):
        u = float(torch.tensor(_stream_uniform(SEED, s), dtype=torch.float32))
        if (steps - u).abs().min() < 1e-5:
            continue
        assert tok == int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True)), s
        checked += 1
    assert checked > 0.99 * len(tokens)


# ---------------------------------------------------------------------------------------
# 2. kd-init: copy-layers copies exactly the chosen layers; pruning keeps what ranks highest.
# ---------------------------------------------------------------------------------------

def _layer_prefix(arch):
    return "transformer.h." if arch == "gpt2" else "model.layers."


def _teacher_name(name, prefix, layer_map):
    if not name.startswith(prefix):
        return name
    i, tail = name[len(prefix):].split(".", 1)
    return f"{prefix}{layer_map[int(i)]}.{tail}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_copy_layers_copies_exactly_the_kept_layers(arch, model_dirs, tmp_path):
    teacher_dir = model_dirs[arch]
    out = tmp_path / "student"
    run_bin("kd-init", "--teacher", teacher_dir, "--out", out, "--init", "copy-layers", "--keep-layers", "0,2",
            "--device", "cpu")
    teacher = load_file(f"{teacher_dir}/model.safetensors")
    student = load_file(out / "model.safetensors")
    prefix = _layer_prefix(arch)
    keep = [0, 2]
    # Exactly the kept layers' tensors plus every non-layer tensor (embeddings, final norm,
    # head), under the student's layer numbering.
    # A tied head (qwen2, gpt2) may be written or left out, as transformers does.
    tied = "lm_head.weight" not in teacher
    buffers = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
    expected = {n for n in teacher if not n.startswith(prefix) and not n.endswith(buffers)}
    expected |= {f"{prefix}{s}.{n[len(prefix):].split('.', 1)[1]}" for s, t in enumerate(keep)
                 for n in teacher if n.startswith(f"{prefix}{t}.") and not n.endswith(buffers)}
    assert {n for n in student if not n.endswith(buffers) and not (tied and n == "lm_head.weight")} == expected
    for name, tensor in student.items():
        src = _teacher_name(name, prefix, keep)
        if src == "lm_head.weight" and tied:  # the head is the embedding
            src = "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"
        assert tensor.dtype == teacher[src].dtype and torch.equal(tensor, teacher[src]), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == 2
    report = json.loads((out / "distillery_init.json").read_text())
    assert report["layer_map"] == keep and report["init"] == "copy-layers"


HD = 16  # tiny llama: hidden 64, 4 heads of 16, 2 kv heads, FFN 128, 3 layers


@pytest.fixture(scope="module")
def constructed_teacher(tmp_path_factory):
    """A tiny llama whose importance ranking is known by construction (importance is
    measured on activations, so the construction scales what produces them):

    * layer 0: o_proj and down_proj scaled by 1e-3, so it barely changes its input (lowest
      block influence): pruning to 2 layers keeps layers 1 and 2;
    * kv groups: v_proj rows of group 1 (layer 1) and group 0 (layer 2) scaled by 10, which
      scales the attention output of both query heads of that group;
    * query heads within each group: q_proj rows of one head scaled by 4 (peaked attention,
      output close to single value vectors) and of the other by 0 (uniform attention,
      output a running mean, smaller): strong heads are 0,2 in layers 0 and 2, 1,3 in layer 1;
    * FFN: in each layer, up_proj rows outside a chosen set of 32 channels scaled by 0.01;
    * hidden: both norms' weights outside a chosen set of 48 channels scaled by 0.01.
    """
    out = str(tmp_path_factory.mktemp("constructed") / "teacher")
    tiny.make_model("llama", out, seed=11)
    t = load_file(f"{out}/model.safetensors")
    layer = "model.layers.{}.".format
    g = torch.Generator().manual_seed(0)
    for name in ["self_attn.o_proj.weight", "mlp.down_proj.weight"]:
        t[layer(0) + name] *= 1e-3
    groups = {1: 1, 2: 0}
    for i, strong in groups.items():
        t[layer(i) + "self_attn.v_proj.weight"][strong * HD:(strong + 1) * HD] *= 10
    strong_heads = {}
    for i in range(3):
        q = t[layer(i) + "self_attn.q_proj.weight"]
        strong_heads[i] = [h for h in range(4) if (h + i) % 2 == 0]
        for h in range(4):
            q[h * HD:(h + 1) * HD] *= 4.0 if h in strong_heads[i] else 0.0
    ffn = {}
    for i in range(3):
        ffn[i] = torch.randperm(128, generator=g)[:32].sort().values.tolist()
        drop = torch.ones(128, dtype=torch.bool)
        drop[ffn[i]] = False
        t[layer(i) + "mlp.up_proj.weight"][drop] *= 0.01
    hidden = torch.randperm(64, generator=g)[:48].sort().values.tolist()
    drop = torch.ones(64, dtype=torch.bool)
    drop[hidden] = False
    for i in range(3):
        for name in ["input_layernorm.weight", "post_attention_layernorm.weight"]:
            t[layer(i) + name][drop] *= 0.01
    save_file(t, f"{out}/model.safetensors", metadata={"format": "pt"})
    return out, {"layers": [1, 2], "groups": groups, "strong_heads": strong_heads, "ffn": ffn, "hidden": hidden}


@torch.no_grad()
def _importance(model_dir, texts):
    """kd-init's documented (Minitron-style) activation importance, measured with hooks on
    transformers' llama, one unpadded sequence at a time: per head the L2 norm of its
    attention output (before o_proj), per FFN channel |act(gate) * up|, per hidden channel
    |output| of both norms of every layer, all summed over tokens; per layer the mean over
    tokens of 1 - cos(layer input, layer output)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    n, nh = cfg.num_hidden_layers, cfg.num_attention_heads
    heads = torch.zeros(n, nh, dtype=torch.float64)
    ffn = torch.zeros(n, cfg.intermediate_size, dtype=torch.float64)
    hidden = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    bi = torch.zeros(n, dtype=torch.float64)
    hooks = []
    for i, lay in enumerate(model.model.layers):
        def on_heads(m, args, i=i):
            x = args[0][0]
            heads[i] += x.view(x.shape[0], nh, -1).norm(dim=-1).sum(0).double()

        def on_ffn(m, args, i=i):
            ffn[i] += args[0][0].abs().sum(0).double()

        def on_norm(m, args, out):
            hidden.add_(out[0].abs().sum(0).double())

        def on_layer(m, args, kwargs, out, i=i):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            bi[i] += (1 - torch.nn.functional.cosine_similarity(x_in[0], x_out[0], dim=-1, eps=1e-8)).sum().double()

        hooks += [lay.self_attn.o_proj.register_forward_pre_hook(on_heads),
                  lay.mlp.down_proj.register_forward_pre_hook(on_ffn),
                  lay.input_layernorm.register_forward_hook(on_norm),
                  lay.post_attention_layernorm.register_forward_hook(on_norm),
                  lay.register_forward_hook(on_layer, with_kwargs=True)]
    tokens = 0
    for text in texts:
        ids = tok(text, add_special_tokens=True, return_tensors="pt").input_ids
        model(ids)
        tokens += ids.shape[1]
    for h in hooks:
        h.remove()
    return {"heads": heads, "ffn": ffn, "hidden": hidden, "bi": bi / tokens}


def _top(scores, k):
    """Indices of the k largest scores (ties to the lower index), ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def _expected_keep(imp, layers, kv_heads, heads, intermediate, hidden, t_kv=2, t_heads=4):
    """kd-init's documented pruning choice: layers by block influence; per kept layer the kv
    groups by the summed importance of their query heads, then the query heads within each
    kept group, the FFN channels; hidden channels over all layers."""
    t_group, s_group = t_heads // t_kv, heads // kv_heads
    keep = {"layers": _top(imp["bi"], layers), "hidden": _top(imp["hidden"], hidden), "per_layer": []}
    for lay in keep["layers"]:
        hs = imp["heads"][lay]
        groups = _top([sum(hs[g * t_group + j] for j in range(t_group)) for g in range(t_kv)], kv_heads)
        q = [g * t_group + j for g in groups for j in _top([hs[g * t_group + j] for j in range(t_group)], s_group)]
        keep["per_layer"].append({"kv": groups, "q": q, "ffn": _top(imp["ffn"][lay], intermediate)})
    return keep


def _rows(heads):
    return [r for h in heads for r in range(h * HD, (h + 1) * HD)]


def _expected_student(teacher, keep):
    """The teacher's tensors sliced to the kept layers, heads, channels and hidden dims."""
    h = torch.tensor(keep["hidden"])
    out = {
        "model.embed_tokens.weight": teacher["model.embed_tokens.weight"][:, h],
        "lm_head.weight": teacher["lm_head.weight"][:, h],
        "model.norm.weight": teacher["model.norm.weight"][h],
    }
    for s, (t, lk) in enumerate(zip(keep["layers"], keep["per_layer"])):
        src, dst = f"model.layers.{t}.", f"model.layers.{s}."
        q, kv, f = torch.tensor(_rows(lk["q"])), torch.tensor(_rows(lk["kv"])), torch.tensor(lk["ffn"])
        out[dst + "self_attn.q_proj.weight"] = teacher[src + "self_attn.q_proj.weight"][q][:, h]
        out[dst + "self_attn.k_proj.weight"] = teacher[src + "self_attn.k_proj.weight"][kv][:, h]
        out[dst + "self_attn.v_proj.weight"] = teacher[src + "self_attn.v_proj.weight"][kv][:, h]
        out[dst + "self_attn.o_proj.weight"] = teacher[src + "self_attn.o_proj.weight"][h][:, q]
        out[dst + "mlp.gate_proj.weight"] = teacher[src + "mlp.gate_proj.weight"][f][:, h]
        out[dst + "mlp.up_proj.weight"] = teacher[src + "mlp.up_proj.weight"][f][:, h]
        out[dst + "mlp.down_proj.weight"] = teacher[src + "mlp.down_proj.weight"][h][:, f]
        for n in ["input_layernorm.weight", "post_attention_layernorm.weight"]:
            out[dst + n] = teacher[src + n][h]
    return out


@pytest.mark.parametrize("kv_heads", [1, 2], ids=["whole-kv-groups", "heads-within-groups"])
def test_prune_keeps_what_ranks_highest(kv_heads, constructed_teacher, text_data, tmp_path):
    teacher_dir, built = constructed_teacher
    shape = dict(layers=2, kv_heads=kv_heads, heads=2, intermediate=32, hidden=48)
    imp = _importance(teacher_dir, TEXTS)
    keep = _expected_keep(imp, **shape)
    # The construction decides the ranking, with a wide margin, under the measured importance.
    assert keep["layers"] == built["layers"] and keep["hidden"] == built["hidden"]
    for lay, lk in zip(keep["layers"], keep["per_layer"]):
        assert lk["ffn"] == built["ffn"][lay]
        if kv_heads == 1:
            assert lk["kv"] == [built["groups"][lay]]
            assert lk["q"] == [2 * built["groups"][lay], 2 * built["groups"][lay] + 1]
        else:
            assert lk["kv"] == [0, 1] and lk["q"] == built["strong_heads"][lay]
        hs = imp["heads"][lay].tolist()
        if kv_heads == 1:  # the kept group's summed score beats the other's
            kept = sum(hs[j] for j in lk["q"])
            assert kept > 1.5 * (sum(hs) - kept)
        else:  # within each group, the kept head beats the other
            for j in lk["q"]:
                assert hs[j] > 1.5 * hs[j ^ 1]
    bi = sorted(imp["bi"].tolist())
    assert bi[1] > 100 * bi[0]

    out = tmp_path / "student"
    run_bin("kd-init", "--teacher", teacher_dir, "--out", out, "--init", "prune", "--calib", text_data,
            *[a for k, v in shape.items() for a in (f"--{k.replace('_', '-')}", v)], "--device", "cpu")
    student = load_file(out / "model.safetensors")
    expected = _expected_student(load_file(f"{teacher_dir}/model.safetensors"), keep)
    assert set(student) == set(expected)
    for name, tensor in expected.items():
        assert student[name].shape == tensor.shape and torch.equal(student[name], tensor), name
    assert json.loads((out / "distillery_init.json").read_text())["layer_map"] == keep["layers"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["head_dim"]) == (2, 48, 2, kv_heads, 32, HD)


# ---------------------------------------------------------------------------------------
# 3. Stored top-K logits: rows line up with completion tokens after multi-token prompts.
# ---------------------------------------------------------------------------------------

K = 16
RTOL16 = 2.0 ** -10  # float16 storage: 11 significant bits, so rounding error <= 2^-11 relative


@torch.no_grad()
def _reference_rows(model, prompt_ids, completion_ids, k):
    """transformers' log-softmax at the positions predicting each completion token, its
    top-k, and the log of the probability outside the top-k (from the full distribution)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    lp = model(ids).logits[0].double().log_softmax(-1)[len(prompt_ids) - 1:-1]
    top, idx = lp.topk(k, -1)
    tail = lp.scatter(1, idx, float("-inf")).logsumexp(-1)
    return lp, top, tail


def _check_rows(stored, pointer, rec, model, sidecar_name):
    assert pointer["file"] == sidecar_name and pointer["k"] == K
    n = len(rec["completion_ids"])
    assert pointer["rows"] == n
    rows = slice(pointer["row"], pointer["row"] + n)
    idx = stored["indices"][rows].long()
    lps, tail = stored["logprobs"][rows].double(), stored["tail_logmass"][rows].double()
    lp, top, ref_tail = _reference_rows(model, rec["prompt_ids"], rec["completion_ids"], K)
    # Ids: transformers' top-K, most likely first; a swap is allowed only between tokens
    # whose reference log-probabilities tie to 1e-5.
    ref_of_stored = lp.gather(1, idx)
    assert ((ref_of_stored - top).abs() < 1e-5).all(), rec["id"]
    assert all(len(set(r)) == K for r in idx.tolist())
    mismatched = (idx != lp.topk(K, -1).indices)
    assert mismatched.float().mean() < 0.05, rec["id"]
    # Values: the reference log-probabilities of those ids, to float16 precision.
    assert ((lps - ref_of_stored).abs() <= 1e-4 + RTOL16 * ref_of_stored.abs()).all(), rec["id"]
    # Tail: log(1 - sum exp(top-K)); float16 storage, plus 1e-3 for the float32 evaluation of
    # 1 - sum (absolute error ~1e-6 in a mass of ~1e-3 here).
    assert ((tail - ref_tail).abs() <= 1e-3 + RTOL16 * ref_tail.abs()).all(), (rec["id"], tail, ref_tail)


def _check_sidecar(path, n_rows):
    stored = load_file(path)
    assert stored["indices"].dtype == torch.int32 and stored["indices"].shape == (n_rows, K)
    assert stored["logprobs"].dtype == torch.float16 and stored["logprobs"].shape == (n_rows, K)
    assert stored["tail_logmass"].dtype == torch.float16 and stored["tail_logmass"].shape == (n_rows,)
    return stored


PAIRS = [
    {"id": "a", "prompt": "It was the best", "completion": " of times, it was the worst of times."},
    {"id": "b", "prompt": "In the beginning God created", "completion": " the heaven and the earth."},
    {"id": "c", "prompt": "Zebra quantum", "completion": " 77 ## purple ledger, and the lazy dog."},
    {"id": "t", "text": "The quick brown fox jumps over the lazy dog."},
]


def test_scored_logits_line_up_with_completion_tokens(trained_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    out = tmp_path / "scored.jsonl"
    run_bin("kd-generate", "--teacher", trained_llama, "--prompts", data, "--out", out, "--score",
            "--store-logits", K, "--batch-size", 3, "--device", "cpu")
    recs = read_jsonl(out)
    tok = AutoTokenizer.from_pretrained(trained_llama)
    model, _ = reference.load(trained_llama)
    for rec, src in zip(recs, PAIRS):
        if "text" in src:
            ids = tok(src["text"], add_special_tokens=True).input_ids
            assert (rec["prompt_ids"], rec["completion_ids"]) == (ids[:1], ids[1:])
        else:
            assert rec["prompt_ids"] == tok(src["prompt"], add_special_tokens=True).input_ids
            assert rec["completion_ids"] == tok(src["completion"], add_special_tokens=False).input_ids
            assert len(rec["prompt_ids"]) > 2
    n = sum(len(r["completion_ids"]) for r in recs)
    stored = _check_sidecar(tmp_path / "scored.jsonl.logits.safetensors", n)
    assert [r["teacher_logits"]["row"] for r in recs] == [sum(len(r["completion_ids"]) for r in recs[:i])
                                                         for i in range(len(recs))]
    for rec in recs:
        _check_rows(stored, rec["teacher_logits"], rec, model, "scored.jsonl.logits.safetensors")


def test_generated_logits_line_up_with_completion_tokens(trained_llama, tmp_path):
    prompts = ["It was the best", "In the beginning God", "Zebra quantum 77", "A teacher model distills its"]
    data = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)])
    out = tmp_path / "gen.jsonl"
    run_bin("kd-generate", "--teacher", trained_llama, "--prompts", data, "--out", out, "--store-logits", K,
            "--max-new-tokens", 10, "--temperature", 1.2, "--samples", 2, "--seed", 4, "--batch-size", 3,
            "--device", "cpu")
    recs = read_jsonl(out)
    tok = AutoTokenizer.from_pretrained(trained_llama)
    model, _ = reference.load(trained_llama)
    n = sum(len(r["completion_ids"]) for r in recs)
    stored = _check_sidecar(tmp_path / "gen.jsonl.logits.safetensors", n)
    # The records' row ranges tile the sidecar: no gaps, no overlaps.
    spans = sorted((r["teacher_logits"]["row"], r["teacher_logits"]["rows"]) for r in recs)
    assert [row for row, _ in spans] == [sum(rows for _, rows in spans[:i]) for i in range(len(spans))]
    assert sum(rows for _, rows in spans) == n
    for rec in recs:
        assert rec["prompt_ids"] == tok(rec["prompt"], add_special_tokens=True).input_ids
        assert len(rec["prompt_ids"]) > 2 and rec["completion_ids"]
        _check_rows(stored, rec["teacher_logits"], rec, model, "gen.jsonl.logits.safetensors")
    # Sampled at temperature 1.2, some completion tokens are not the teacher's top-1: the
    # rows are the temperature-1 distributions all the same.
    top1 = [stored["indices"][r["teacher_logits"]["row"] + i, 0].item() for r in recs
            for i in range(len(r["completion_ids"]))]
    assert top1 != [t for r in recs for t in r["completion_ids"]]


# ---------------------------------------------------------------------------------------
# 4. bf16 and sharded checkpoints: perplexity against transformers on the same checkpoint.
# ---------------------------------------------------------------------------------------

def _eval_ppl(model_dir, data, out, *flags):
    run_bin("kd-eval", "--model", model_dir, "--data", data, "--out", out, "--device", "cpu", *flags)
    return json.loads(out.read_text())


def _resave(src, dst, dtype, **kw):
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.to(dtype).save_pretrained(dst, **kw)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(f"{src}/{f}", dst)
    return dst


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # qwen2 (tied): the bf16 sharded test below
def test_sharded_checkpoint_perplexity_matches_transformers(arch, model_dirs, text_data, tmp_path):
    sharded = _resave(model_dirs[arch], tmp_path / "sharded", torch.float32, max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and not (sharded / "model.safetensors").exists()
    ours = _eval_ppl(sharded, text_data, tmp_path / "m.json")["perplexity"]
    theirs = reference.perplexity(str(sharded), TEXTS)
    assert abs(ours - theirs) / theirs < 1e-4, (ours, theirs)
    # The same weights as one file give the same number.
    assert ours == _eval_ppl(model_dirs[arch], text_data, tmp_path / "one.json")["perplexity"]


# bf16 compute: both sides round activations to 8 significant bits, at different points
# (kernels, reduction order, where upcasts happen). Measured on these tiny random
# checkpoints, kd-eval --dtype bf16 against transformers in bf16 on the CPU: relative
# perplexity differences of 1.1e-4 to 3.5e-4 over the five architectures; 2e-3 allows for
# that and still catches a wrongly read weight (bf16 rounding of the weights alone moves
# perplexity by 1.5e-3 to 2.4e-3 here).
BF16_RTOL = 2e-3


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_bf16_checkpoint_perplexity_matches_transformers(sharded, model_dirs, text_data, tmp_path):
    arch = "qwen2" if sharded else "llama"
    kw = {"max_shard_size": "20KB"} if sharded else {}
    ckpt = _resave(model_dirs[arch], tmp_path / "bf16", torch.bfloat16, **kw)
    tensors = {}
    for f in ckpt.glob("*.safetensors"):
        tensors.update(load_file(f))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    # --dtype f32 upcasts the bf16 weights exactly: equal to transformers loading them in fp32.
    ours32 = _eval_ppl(ckpt, text_data, tmp_path / "f32.json", "--dtype", "f32")
    theirs32 = reference.perplexity(str(ckpt), TEXTS, dtype=torch.float32)
    assert ours32["dtype"] == "float32"
    assert abs(ours32["perplexity"] - theirs32) / theirs32 < 1e-4, (ours32["perplexity"], theirs32)
    # The bf16 rounding of the weights shows: the fp32 original's perplexity differs by far
    # more than 1e-4, so the comparison above really read the bf16 values.
    original = reference.perplexity(model_dirs[arch], TEXTS)
    assert abs(original - theirs32) / theirs32 > 5e-4
    # --dtype bf16 computes in bf16, as transformers does with dtype=bfloat16.
    ours16 = _eval_ppl(ckpt, text_data, tmp_path / "bf16.json", "--dtype", "bf16")
    theirs16 = reference.perplexity(str(ckpt), TEXTS, dtype=torch.bfloat16)
    assert ours16["dtype"] == "bfloat16"
    assert abs(ours16["perplexity"] - theirs16) / theirs16 < BF16_RTOL, (ours16["perplexity"], theirs16, theirs32)
