"""GGUF: models read from .gguf files written by independent tools (llama.cpp's own
convert_hf_to_gguf.py and llama-quantize, from the sources vendored in the llama-cpp-python
sdist), checked against transformers' GGUF loading; students exported to GGUF, reloaded by
transformers and run by llama.cpp; bad files refused with a clear message."""
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from conftest import ROOT, run_bin, write_jsonl

sys.path.insert(0, str(ROOT / "scripts"))
import llamacpp  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A teacher model distills its knowledge into a smaller student model.",
    "In the beginning God created the heaven and the earth.",
    "Numbers like 12345 and 2026 appear in text, as do symbols: #, %, &.",
]
SPECIAL_TEXT = "<s>It was the best of times</s><pad> it was the worst of times."


@pytest.fixture(scope="session")
def gguf_env(tmp_path_factory):
    """Keeps GGUF side files of this session apart, and the llama.cpp sources fetched once."""
    llamacpp.fetch()
    return {"DISTILLERY_CACHE": os.environ.get("DISTILLERY_CACHE") or str(llamacpp.cache_root().parent.parent)}


def plain_rope(model_dir):
    """Plain RoPE, as transformers' GGUF loader (the reference here) reads it: it drops the
    `rope_freqs` tensor Llama 3 scaling travels as (test_llama3_rope_scaling_travels_as_rope_freqs)."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("rope_scaling", None)
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 10000.0
    path.write_text(json.dumps(cfg))
    return model_dir


# What llama.cpp's converter needs of tiny configs: GPT-2's `n_ctx`, and room in the
# embeddings for the extra token transformers' Qwen2 tokenizer class adds on loading, and
# the defaults transformers' GGUF loader assumes where it reads no key (Qwen3's head width,
# GPT-2's positions).
CONVERTER_NEEDS = {"gpt2": {"n_ctx": 1024, "n_positions": 1024}, "qwen2": {"vocab_size": 304}, "qwen3": {"vocab_size": 304, "head_dim": 128}}


def hf_model(arch, root, **overrides):
    out = str(root / arch)
    tiny.make_model(arch, out, seed=3, **{**CONVERTER_NEEDS.get(arch, {}), **overrides})
    return plain_rope(out)


def convert(hf_dir, out, outtype):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "llamacpp.py"), "convert", hf_dir, out, outtype],
                   check=True, capture_output=True)
    return out


@torch.no_grad()
def transformers_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(d, gguf_file=f)


@torch.no_grad()
def perplexity(model, tok, texts):
    nll, n = 0.0, 0
    for t in texts:
        ids = tok(t, add_special_tokens=True, return_tensors="pt").input_ids
        lp = model(ids).logits[0, :-1].double().log_softmax(-1)
        nll -= lp.gather(1, ids[0, 1:, None]).sum().item()
        n += ids.shape[1] - 1
    return math.exp(nll / n)


def check_against_transformers(gguf, tmp_path, env, exact_weights=True):
    """kd-convert's weights equal transformers' dequantisation; kd-eval's perplexity on the
    .gguf equals transformers' on the same file; the tokenizers give the same ids."""
    model, tok = transformers_gguf(gguf)
    out = tmp_path / ("hf-" + Path(gguf).stem)
    run_bin("kd-convert", "--model", gguf, "--out", out, env=env)
    ours = load_file(str(out / "model.safetensors"))
    ref = {k: v for k, v in model.state_dict().items() if k in ours}
    assert set(ours) == set(ref), set(ours) ^ set(ref)
    for k, v in ref.items():
        diff = (ours[k].float() - v.float()).abs().max().item()
        assert diff <= (0.0 if exact_weights else 1e-6), f"{gguf}: {k} differs by {diff}"
    data = write_jsonl(tmp_path / "texts.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)])
    res = tmp_path / "eval.json"
    run_bin("kd-eval", "--model", gguf, "--data", data, "--out", res, "--device", "cpu", env=env)
    got = json.loads(res.read_text())["perplexity"]
    want = perplexity(model, tok, TEXTS)
    assert abs(got - want) / want < 1e-5, (gguf, got, want)
    from tokenizers import Tokenizer

    ours_tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS + [SPECIAL_TEXT]:
        assert ours_tok.encode(text).ids == tok(text).input_ids, text
    return got


# Every architecture in F32 and Q8_0; the other float types once (their decoding does not
# depend on the architecture).
CONVERTED = [(a, t) for a in ("llama", "qwen2", "qwen3", "gpt2") for t in ("f32", "q8_0")] + [("llama", "f16"), ("qwen2", "bf16")]


@pytest.mark.parametrize("arch,outtype", CONVERTED)
def test_converted_models_load_like_transformers(arch, outtype, gguf_env, tmp_path):
    hf = hf_model(arch, tmp_path)
    gguf = convert(hf, str(tmp_path / f"{arch}-{outtype}.gguf"), outtype)
    ppl = check_against_transformers(gguf, tmp_path, gguf_env)
    if outtype == "f32":
        # The f32 file is the Hugging Face checkpoint itself: same perplexity as the directory.
        res = tmp_path / "dir.json"
        data = tmp_path / "texts.jsonl"
        run_bin("kd-eval", "--model", hf, "--data", data, "--out", res, "--device", "cpu")
        assert abs(json.loads(res.read_text())["perplexity"] - ppl) / ppl < 1e-5


QUANT_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q2_K": 10, "Q3_K_S": 11, "Q4_K_S": 12, "Q5_K_S": 13, "Q6_K": 14}


@pytest.fixture(scope="session")
def llama_bin(gguf_env):
    return llamacpp.build()


@pytest.fixture(scope="session")
def wide_f32(tmp_path_factory, gguf_env):
    """A llama whose rows are multiples of 256, so that the K-quants apply to its matrices."""
    root = tmp_path_factory.mktemp("wide")
    hf = hf_model("llama", root, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, head_dim=64)
    return convert(hf, str(root / "wide-f32.gguf"), "f32")


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", list(QUANT_TYPES))
def test_quantized_types_dequantize_like_gguf(qtype, wide_f32, llama_bin, gguf_env, tmp_path):
    out = tmp_path / f"wide-{qtype}.gguf"
    subprocess.run([str(llama_bin / "llama-quantize"), wide_f32, str(out), qtype], check=True, capture_output=True)
    from gguf import GGUFReader

    types = {int(t.tensor_type) for t in GGUFReader(str(out)).tensors}
    assert QUANT_TYPES[qtype] in types, f"llama-quantize wrote {types} for {qtype}"
    check_against_transformers(str(out), tmp_path, gguf_env)


def test_real_smollm2_gguf_matches_transformers(smollm2_gguf, gguf_env, tmp_path):
    model, tok = transformers_gguf(smollm2_gguf)
    data = write_jsonl(tmp_path / "texts.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)])
    res = tmp_path / "eval.json"
    run_bin("kd-eval", "--model", smollm2_gguf, "--data", data, "--out", res, "--device", "cpu", env=gguf_env)
    got, want = json.loads(res.read_text())["perplexity"], perplexity(model, tok, TEXTS)
    assert abs(got - want) / want < 1e-5, (got, want)
    # The chat template renders and tokenizes as transformers does.
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "q", "prompt": "What is the capital of France?"}])
    out = tmp_path / "gen.jsonl"
    run_bin("kd-generate", "--teacher", smollm2_gguf, "--prompts", prompts, "--out", out, "--chat-template",
            "--max-new-tokens", 12, "--device", "cpu", env=gguf_env)
    rec = json.loads(out.read_text())
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert rec["prompt_ids"] == tok(chat, add_special_tokens=False).input_ids
    ids = torch.tensor([rec["prompt_ids"]])
    want_ids = model.generate(ids, do_sample=False, max_new_tokens=12)[0, ids.shape[1]:].tolist()
    eos = tok.eos_token_id
    want_ids = want_ids[: want_ids.index(eos) + 1] if eos in want_ids else want_ids
    assert rec["completion_ids"] == want_ids


EXPORTED = [("llama", "f32"), ("qwen2", "f32"), ("qwen3", "f32"), ("llama", "f16"), ("qwen3", "bf16"), ("qwen2", "q8_0")]


@pytest.fixture(scope="session")
def trained_qwen2(tmp_path_factory):
    """A model with real structure: top-1 agreement under quantisation means something only
    where the logits have margins (random tiny models have almost none)."""
    from conftest import train_tiny

    return train_tiny("qwen2", str(tmp_path_factory.mktemp("trained") / "qwen2"))


@pytest.mark.parametrize("arch,etype", EXPORTED)
def test_exported_students_reload_in_transformers(arch, etype, tmp_path, request):
    hf = request.getfixturevalue("trained_qwen2") if etype == "q8_0" else hf_model(arch, tmp_path)
    out = tmp_path / f"student-{etype}.gguf"
    run_bin("kd-export", "--model", hf, "--format", "gguf", "--type", etype, "--out", out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    got, gtok = transformers_gguf(str(out))
    for text in TEXTS + [SPECIAL_TEXT]:
        assert gtok(text).input_ids == tok(text).input_ids, text
    with torch.no_grad():
        ids = tok(TEXTS, return_tensors="pt", padding=True)
        a = ref(**ids).logits
        b = got(**ids).logits
    mask = ids.attention_mask.bool()
    a, b = a[mask], b[mask]
    if etype == "f32":
        assert (a - b).abs().max().item() < 1e-4
    elif etype in ("f16", "bf16"):
        tol = {"f16": 2e-2, "bf16": 1.5e-1}[etype]
        assert (a - b).abs().max().item() < tol * a.abs().max().item()
    else:
        agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        assert agree >= 0.99, agree
        # The blocks are ggml's reference quantisation, byte for byte (gguf-py's is bit-exact
        # with ggml-quants.c); Qwen2 has no Q/K permutation, so HF rows are GGUF rows.
        from gguf import GGUFReader, GGMLQuantizationType, quants

        weights = {k: v.float().numpy() for k, v in ref.state_dict().items()}
        names = {"token_embd.weight": "model.embed_tokens.weight", "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
                 "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight"}
        tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
        for g, h in names.items():
            t = tensors[g]
            assert t.tensor_type == GGMLQuantizationType.Q8_0, g
            assert bytes(t.data.tobytes()) == bytes(quants.quantize(weights[h], GGMLQuantizationType.Q8_0).tobytes()), g


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_llamacpp_runs_exported_students_greedy_like_us(arch, llama_bin, tmp_path):
    hf = hf_model(arch, tmp_path)
    gguf = tmp_path / "student.gguf"
    run_bin("kd-export", "--model", hf, "--format", "gguf", "--type", "f32", "--out", gguf)
    prompts = ["The quick brown", "A teacher model", "In the beginning"]
    recs = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)])
    ours = tmp_path / "ours.jsonl"
    run_bin("kd-generate", "--teacher", hf, "--prompts", recs, "--out", ours, "--max-new-tokens", 16, "--device", "cpu")
    ours = [json.loads(line) for line in ours.read_text().splitlines()]
    port = free_port()
    server = subprocess.Popen([str(llama_bin / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                               "-c", "256", "-t", "2", "--no-warmup"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if json.load(urllib.request.urlopen(url + "/health", timeout=2)).get("status") == "ok":
                    break
            except Exception:
                time.sleep(0.2)
        else:
            raise AssertionError("llama-server did not start: " + server.stderr.read().decode()[-2000:])
        for rec in ours:
            body = json.dumps({"prompt": rec["prompt_ids"], "n_predict": 16, "temperature": 0, "top_k": 1,
                               "cache_prompt": False, "return_tokens": True}).encode()
            req = urllib.request.Request(url + "/completion", body, {"Content-Type": "application/json"})
            got = json.load(urllib.request.urlopen(req, timeout=60))
            n = len(rec["completion_ids"])
            # Ours stops at EOS (and keeps it); llama.cpp stops before printing it.
            want = [t for t in rec["completion_ids"] if t != 1]
            assert got["tokens"][: len(want)] == want, (rec["prompt"], got["tokens"], rec["completion_ids"], n)
    finally:
        server.terminate()
        server.wait(timeout=30)


# Llama 3 rope scaling: tiny's own (theta 5e5, no blended frequency) and one with two blended.
LLAMA3_ROPE = [
    None,
    {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
     "original_max_position_embeddings": 1024},
]


@pytest.mark.parametrize("rope", LLAMA3_ROPE, ids=["tiny", "blended"])
def test_llama3_rope_scaling_travels_as_rope_freqs(rope, gguf_env, tmp_path):
    """llama.cpp's converter writes Llama 3 scaling as per-frequency factors (`rope_freqs`):
    reading the file gives the Hugging Face checkpoint's perplexity (transformers on the
    directory; its own GGUF loader drops the factors), kd-convert writes a rope_scaling that
    transformers reads back to the same figure, and kd-export writes the same factors."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = str(tmp_path / "llama3")
    tiny.make_model("llama", hf, seed=3)
    cfg = json.loads((Path(hf) / "config.json").read_text())
    if rope:
        cfg["rope_parameters"] = rope
    (Path(hf) / "config.json").write_text(json.dumps(cfg))
    assert cfg["rope_parameters"]["rope_type"] == "llama3"
    gguf = convert(hf, str(tmp_path / "llama3.gguf"), "f32")
    factors = [t for t in GGUFReader(gguf).tensors if t.name == "rope_freqs.weight"][0].data
    assert (factors != 1).any(), "the scaling changes some frequencies"
    want = perplexity(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32), AutoTokenizer.from_pretrained(hf), TEXTS)
    data = write_jsonl(tmp_path / "texts.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)])
    run_bin("kd-eval", "--model", gguf, "--data", data, "--out", tmp_path / "e.json", "--device", "cpu", env=gguf_env)
    got = json.loads((tmp_path / "e.json").read_text())["perplexity"]
    assert abs(got - want) / want < 1e-5, (got, want)
    out = tmp_path / "converted"
    run_bin("kd-convert", "--model", gguf, "--out", out, env=gguf_env)
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["rope_type"] == "llama3"
    back = perplexity(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32), AutoTokenizer.from_pretrained(str(out)), TEXTS)
    assert abs(back - want) / want < 1e-5, (back, want)
    exported = tmp_path / "exported.gguf"
    run_bin("kd-export", "--model", hf, "--format", "gguf", "--type", "f32", "--out", exported)
    ours = [t for t in GGUFReader(str(exported)).tensors if t.name == "rope_freqs.weight"][0].data
    assert torch.allclose(torch.tensor(ours), torch.tensor(factors), rtol=1e-6)


def test_bad_gguf_files_are_named_and_nothing_is_written(gguf_env, tmp_path):
    hf = hf_model("llama", tmp_path)
    good = Path(convert(hf, str(tmp_path / "good.gguf"), "f32")).read_bytes()
    cases = {
        "truncated": (good[: len(good) // 2], "truncated"),
        "magic": (b"GGUX" + good[4:], "wrong magic number"),
    }
    # An IQ2_XXS type id in the first tensor info: found after its name.
    from gguf import GGUFReader

    first = GGUFReader(str(tmp_path / "good.gguf")).tensors[0]
    at = good.index(first.name.encode()) + len(first.name) + 4 + 8 * len(first.shape)
    cases["type"] = (good[:at] + (16).to_bytes(4, "little") + good[at + 4:], "IQ2_XXS")
    for label, (data, message) in cases.items():
        path = tmp_path / f"{label}.gguf"
        path.write_bytes(data)
        out = tmp_path / f"out-{label}"
        proc = run_bin("kd-convert", "--model", path, "--out", out, check=False, env=gguf_env)
        assert proc.returncode == 1, label
        assert message in proc.stderr and str(path) in proc.stderr, (label, proc.stderr)
        assert "panicked" not in proc.stderr
        assert not out.exists(), label
