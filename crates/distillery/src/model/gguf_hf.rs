//! Between GGUF and Hugging Face checkpoints: the config, tensor names (and llama.cpp's
//! Q/K row permutation), and the tokenizer rebuilt from `tokenizer.ggml.*`, in both
//! directions. Reading is what makes a `.gguf` usable wherever a model is read; writing is
//! `kd-export --format gguf`.
use crate::model::arch::{Arch, Positions};
use crate::model::causal_lm::rope_frequencies;
use crate::model::config::{Llama3RopeScaling, ModelConfig};
use crate::model::gguf::{GgufFile, Meta};
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// Llama 3's pre-scaling context, which llama.cpp's files do not record: any value gives the
/// same frequencies once the thresholds are fitted to it.
const LLAMA3_ORIGINAL_CONTEXT: f64 = 8192.0;

/// llama.cpp's `rope_freqs` for Llama 3 scaling: per RoPE frequency, the divisor the scaling
/// applies to it (1 for short wavelengths, `factor` for long ones, a blend between).
pub fn llama3_factors(s: &Llama3RopeScaling, theta: f64, head_dim: usize) -> Vec<f64> {
    let base = rope_frequencies(theta, head_dim, None);
    base.iter().zip(rope_frequencies(theta, head_dim, Some(s))).map(|(b, scaled)| b / scaled).collect()
}

/// The Llama 3 scaling whose factors are `factors` (None when every factor is 1). Only the
/// wavelength thresholds matter, not how `original` splits them, so `original` is taken as
/// given and the two frequency factors fitted: from the blended frequencies when there are
/// two or more (a line in 1/wavelength), else midway between the neighbouring frequencies.
/// The fit must give the factors back (to float32 precision), or the file is refused.
pub fn llama3_from_factors(factors: &[f64], theta: f64, head_dim: usize, original: f64) -> Result<Option<Llama3RopeScaling>> {
    ensure!(factors.len() == head_dim / 2, "`rope_freqs.weight` has {} values, the head width {head_dim} needs {}", factors.len(), head_dim / 2);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
    if factors.iter().all(|&f| close(f, 1.0)) {
        return Ok(None);
    }
    let factor = factors.iter().copied().fold(f64::MIN, f64::max);
    ensure!(factor > 1.0, "`rope_freqs.weight` has factors below 1: not Llama 3 rope scaling");
    // x = 1 / wavelength falls with the index; s(x) = (x - x_low) / (x_high - x_low).
    let x: Vec<f64> = (0..factors.len()).map(|i| 1.0 / (2.0 * std::f64::consts::PI * theta.powf((2 * i) as f64 / head_dim as f64))).collect();
    let blended: Vec<usize> = (0..factors.len()).filter(|&i| !close(factors[i], 1.0) && !close(factors[i], factor)).collect();
    let smooth = |i: usize| (1.0 / factors[i] - 1.0 / factor) / (1.0 - 1.0 / factor);
    let last_one = (0..factors.len()).rev().find(|&i| close(factors[i], 1.0));
    let first_full = (0..factors.len()).find(|&i| close(factors[i], factor));
    let (x_high, x_low) = if blended.len() >= 2 {
        // Least squares of s = a x + c over the blended frequencies.
        let n = blended.len() as f64;
        let (mx, ms) = (blended.iter().map(|&i| x[i]).sum::<f64>() / n, blended.iter().map(|&i| smooth(i)).sum::<f64>() / n);
        let sxx: f64 = blended.iter().map(|&i| (x[i] - mx).powi(2)).sum();
        let sxs: f64 = blended.iter().map(|&i| (x[i] - mx) * (smooth(i) - ms)).sum();
        let a = sxs / sxx;
        let c = ms - a * mx;
        ((1.0 - c) / a, -c / a)
    } else {
        let mid = |a: Option<usize>, b: Option<usize>, edge: f64| match (a, b) {
            (Some(a), Some(b)) => (x[a] + x[b]) / 2.0,
            _ => edge,
        };
        let first_off = last_one.map(|i| i + 1).or(Some(0));
        let last_off = first_full.map(|i| i.saturating_sub(1));
        let x_high = mid(last_one, first_off.filter(|&i| i < factors.len()), x[0] * 2.0);
        let x_low = mid(last_off, first_full, x[factors.len() - 1] / 2.0);
        match blended.first() {
            // One blended frequency x_i with weight s fixes one threshold given the other:
            // s = (x_i - x_low) / (x_high - x_low). Either threshold midway to its neighbour,
            // whichever leaves the other between its neighbours.
            Some(&i) => {
                let (si, above, below) = (smooth(i), if i > 0 { x[i - 1] } else { f64::INFINITY }, x.get(i + 1).copied().unwrap_or(0.0));
                let from_high = (x_high, (x[i] - si * x_high) / (1.0 - si));
                let from_low = (x_low + (x[i] - x_low) / si, x_low);
                if from_high.1 > below && from_high.1 < x[i] {
                    from_high
                } else if from_low.0 < above && from_low.0 > x[i] {
                    from_low
                } else {
                    from_high
                }
            }
            None => (x_high, x_low),
        }
    };
    let sc = Llama3RopeScaling { factor, low_freq_factor: original * x_low, high_freq_factor: original * x_high, original_max_position_embeddings: original };
    let back = llama3_factors(&sc, theta, head_dim);
    for (i, (&want, got)) in factors.iter().zip(back).enumerate() {
        ensure!(
            (want - got).abs() <= 1e-4 * want,
            "`rope_freqs.weight` does not follow Llama 3's rope scaling rule (frequency {i}: {want}, the closest Llama 3 scaling gives {got})"
        );
    }
    Ok(Some(sc))
}

/// The files a Hugging Face directory would hold for a GGUF model, weights aside.
pub struct HfSideFiles {
    pub config: Value,
    pub tokenizer: Value,
    pub tokenizer_config: Value,
    pub generation_config: Value,
}

/// GGUF architecture names this crate maps, and the `model_type` each becomes. llama.cpp
/// writes Mistral checkpoints as `llama`.
fn model_type_of(gguf_arch: &str) -> Option<&'static str> {
    Some(match gguf_arch {
        "llama" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        "gpt2" => "gpt2",
        _ => return None,
    })
}

fn meta_u64(g: &GgufFile, key: &str) -> Result<u64> {
    g.arch_key(key).and_then(Meta::as_u64).with_context(|| format!("metadata has no `{}.{key}`", g.architecture().unwrap_or("?")))
}

fn tokens(g: &GgufFile) -> Result<Vec<String>> {
    let arr = g.get("tokenizer.ggml.tokens").and_then(Meta::as_array).context("metadata has no `tokenizer.ggml.tokens`")?;
    arr.iter().map(|t| t.as_str().map(String::from).context("`tokenizer.ggml.tokens` holds a non-string")).collect()
}

fn token_id(g: &GgufFile, key: &str) -> Option<i64> {
    g.get(&format!("tokenizer.ggml.{key}")).and_then(Meta::as_i64)
}

/// config.json, tokenizer.json, tokenizer_config.json and generation_config.json of a GGUF.
pub fn side_files(g: &GgufFile) -> Result<HfSideFiles> {
    let arch = g.architecture()?;
    let model_type = model_type_of(arch).with_context(|| format!("GGUF architecture `{arch}` is not supported (supported: llama, mistral as llama, qwen2, qwen3, gpt2)"))?;
    let spec = Arch::from_model_type(model_type).unwrap().spec();
    let toks = tokens(g)?;
    let vocab = g.arch_key("vocab_size").and_then(Meta::as_u64).unwrap_or(toks.len() as u64);
    let has = |name: &str| g.tensors.iter().any(|t| t.name == name);
    let heads = meta_u64(g, "attention.head_count")?;
    let mut c = Map::new();
    c.insert("model_type".into(), json!(model_type));
    c.insert("architectures".into(), json!([spec.hf_class]));
    c.insert("vocab_size".into(), json!(vocab));
    c.insert("tie_word_embeddings".into(), json!(!has("output.weight")));
    let k = &spec.keys;
    c.insert(k.hidden.into(), json!(meta_u64(g, "embedding_length")?));
    c.insert(k.layers.into(), json!(meta_u64(g, "block_count")?));
    c.insert(k.heads.into(), json!(heads));
    c.insert(k.intermediate.into(), json!(meta_u64(g, "feed_forward_length")?));
    c.insert(k.max_positions.into(), json!(g.arch_key("context_length").and_then(Meta::as_u64).unwrap_or(2048)));
    if spec.positions == Positions::Rope {
        if let Some(t) = g.tensors.iter().find(|t| t.name == "rope_freqs.weight") {
            let theta = g.arch_key("rope.freq_base").and_then(Meta::as_f64).unwrap_or(10000.0);
            let head_dim = g.arch_key("attention.key_length").and_then(Meta::as_u64).unwrap_or(meta_u64(g, "embedding_length")? / heads);
            let original = g.arch_key("rope.scaling.original_context_length").and_then(Meta::as_f64).unwrap_or(LLAMA3_ORIGINAL_CONTEXT);
            let factors: Vec<f64> = g.dequantize(t)?.into_iter().map(f64::from).collect();
            if let Some(sc) = llama3_from_factors(&factors, theta, head_dim as usize, original)? {
                c.insert(
                    "rope_scaling".into(),
                    json!({"rope_type": "llama3", "factor": sc.factor, "low_freq_factor": sc.low_freq_factor,
                           "high_freq_factor": sc.high_freq_factor, "original_max_position_embeddings": sc.original_max_position_embeddings}),
                );
            }
        }
        c.insert(k.norm_eps.into(), json!(g.arch_key("attention.layer_norm_rms_epsilon").and_then(Meta::as_f64).unwrap_or(1e-6)));
        c.insert("rope_theta".into(), json!(g.arch_key("rope.freq_base").and_then(Meta::as_f64).unwrap_or(10000.0)));
        c.insert(k.kv_heads.unwrap().into(), json!(g.arch_key("attention.head_count_kv").and_then(Meta::as_u64).unwrap_or(heads)));
        if let Some(hd) = g.arch_key("attention.key_length").and_then(Meta::as_u64) {
            c.insert(k.head_dim.unwrap().into(), json!(hd));
        }
        c.insert("hidden_act".into(), json!("silu"));
        if model_type == "llama" {
            c.insert("attention_bias".into(), json!(has("blk.0.attn_q.bias")));
        }
    } else {
        c.insert(k.norm_eps.into(), json!(g.arch_key("attention.layer_norm_epsilon").and_then(Meta::as_f64).unwrap_or(1e-5)));
    }
    for (hf, key) in [("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")] {
        if let Some(id) = token_id(g, key) {
            c.insert(hf.into(), json!(id));
        }
    }
    let config = Value::Object(c);
    let tokenizer = tokenizer_json(g, &toks)?;
    let name = |key: &str| token_id(g, key).and_then(|i| toks.get(i as usize).cloned());
    let mut tc = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": g.get("tokenizer.ggml.add_bos_token").and_then(Meta::as_bool).unwrap_or(false),
        "add_eos_token": g.get("tokenizer.ggml.add_eos_token").and_then(Meta::as_bool).unwrap_or(false),
        "bos_token": name("bos_token_id"),
        "eos_token": name("eos_token_id"),
        "pad_token": name("padding_token_id"),
        "unk_token": name("unknown_token_id"),
    });
    if let Some(t) = g.get("tokenizer.chat_template").and_then(Meta::as_str) {
        tc["chat_template"] = json!(t);
    }
    if let Some(p) = g.get("tokenizer.ggml.pre").and_then(Meta::as_str) {
        // Kept so that an export writes the same pre-tokenizer name back.
        tc["gguf_pre_tokenizer"] = json!(p);
    }
    let mut gen = json!({});
    for (hf, key) in [("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")] {
        if let Some(id) = token_id(g, key) {
            gen[hf] = json!(id);
        }
    }
    Ok(HfSideFiles { config, tokenizer, tokenizer_config: tc, generation_config: gen })
}

/// GPT-2's byte-to-character map (printable stand-ins for every byte).
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        map[*b as usize] = char::from_u32(c).unwrap();
    }
    map
}

/// The split regex a GGUF `tokenizer.ggml.pre` names (llama.cpp's `llama-vocab.cpp`), for
/// the pre-tokenizers that differ from GPT-2's.
fn pre_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" => LLAMA3,
        "qwen2" | "deepseek-r1-qwen" => QWEN2,
        _ => return None,
    })
}

/// The pre-tokenizer of a byte-level BPE vocabulary, as llama.cpp applies `pre`: GPT-2's
/// split by default, digits one by one first for `smollm`, or the pre's own regex.
fn byte_level_pre_tokenizer(pre: &str) -> Value {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    match (pre, pre_split(pre)) {
        (_, Some(re)) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        ("smollm", None) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        _ => byte_level(true),
    }
}

/// A tokenizer.json for the vocabulary in the metadata: byte-level BPE (`gpt2`) or
/// SentencePiece-style BPE with byte fallback (`llama`), with the special tokens marked
/// CONTROL (type 3) and the user-defined ones (type 4) kept whole.
fn tokenizer_json(g: &GgufFile, toks: &[String]) -> Result<Value> {
    let model = g.get("tokenizer.ggml.model").and_then(Meta::as_str).context("metadata has no `tokenizer.ggml.model`")?;
    let types: Vec<i64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(Meta::as_array)
        .map(|a| a.iter().map(|t| t.as_i64().unwrap_or(1)).collect())
        .unwrap_or_default();
    let mut vocab = Map::new();
    for (i, t) in toks.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(json!(i));
    }
    let merges: Vec<Value> = match g.get("tokenizer.ggml.merges").and_then(Meta::as_array) {
        Some(m) => m
            .iter()
            .map(|s| {
                let s = s.as_str().context("a merge is not a string")?;
                let (a, b) = s.split_once(' ').with_context(|| format!("merge `{s}` is not two tokens"))?;
                Ok(json!([a, b]))
            })
            .collect::<Result<_>>()?,
        None if model == "llama" => {
            let scores: Vec<f64> = g
                .get("tokenizer.ggml.scores")
                .and_then(Meta::as_array)
                .context("a SentencePiece vocabulary without merges needs `tokenizer.ggml.scores`")?
                .iter()
                .map(|s| s.as_f64().unwrap_or(0.0))
                .collect();
            merges_from_scores(toks, &scores).into_iter().map(|(a, b)| json!([a, b])).collect()
        }
        None => bail!("a byte-level BPE vocabulary needs `tokenizer.ggml.merges`"),
    };
    let added: Vec<Value> = toks
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                              "normalized": false, "special": types[i] == 3}))
        .collect();
    let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(Meta::as_bool).unwrap_or(model == "llama");
    let add_eos = g.get("tokenizer.ggml.add_eos_token").and_then(Meta::as_bool).unwrap_or(false);
    let special = |key: &str| token_id(g, key).and_then(|i| toks.get(i as usize).map(|t| (i, t.clone())));
    let mut single = vec![];
    let mut specials = Map::new();
    for (flag, key) in [(add_bos, "bos_token_id")] {
        if let (true, Some((id, t))) = (flag, special(key)) {
            single.push(json!({"SpecialToken": {"id": t, "type_id": 0}}));
            specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let (true, Some((id, t))) = (add_eos, special("eos_token_id")) {
        single.push(json!({"SpecialToken": {"id": t, "type_id": 0}}));
        specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    let post = json!({"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": specials});
    let (normalizer, pre_tokenizer, decoder, bpe_extra) = match model {
        "gpt2" => {
            let pre = g.get("tokenizer.ggml.pre").and_then(Meta::as_str).unwrap_or("default");
            (Value::Null, byte_level_pre_tokenizer(pre), json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}), json!({"byte_fallback": false}))
        }
        "llama" => {
            let prefix = g.get("tokenizer.ggml.add_space_prefix").and_then(Meta::as_bool).unwrap_or(true);
            (
                Value::Null,
                json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": if prefix { "first" } else { "never" }, "split": false}),
                json!({"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": if prefix { 1 } else { 0 }, "stop": 0}]}),
                json!({"byte_fallback": true, "unk_token": special("unknown_token_id").map(|(_, t)| t)}),
            )
        }
        other => bail!("tokenizer model `{other}` is not supported (supported: gpt2, llama)"),
    };
    let mut bpe = json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                         "end_of_word_suffix": null, "fuse_unk": model == "llama", "ignore_merges": false,
                         "vocab": vocab, "merges": merges});
    for (k, v) in bpe_extra.as_object().unwrap() {
        bpe[k] = v.clone();
    }
    Ok(json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": normalizer,
              "pre_tokenizer": pre_tokenizer, "post_processor": post, "decoder": decoder, "model": bpe}))
}

/// BPE merges implied by a SentencePiece vocabulary: every split of a token into two
/// vocabulary pieces, best-scored merged token first (as transformers' `generate_merges`).
fn merges_from_scores(toks: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let rank: HashMap<&str, usize> = toks.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(String, String, f64)> = vec![];
    for (t, &score) in toks.iter().zip(scores) {
        let chars: Vec<(usize, char)> = t.char_indices().collect();
        let mut local = vec![];
        for &(at, _) in chars.iter().skip(1) {
            let (l, r) = t.split_at(at);
            if rank.contains_key(l) && rank.contains_key(r) {
                local.push((l.to_string(), r.to_string(), score));
            }
        }
        local.sort_by_key(|(l, r, _)| (rank[l.as_str()], rank[r.as_str()]));
        merges.extend(local);
    }
    // Stable: equal keys keep the vocabulary order, as Python's sorted(reverse=True) does.
    merges.sort_by(|a, b| {
        (b.2, b.0.chars().count(), b.1.chars().count()).partial_cmp(&(a.2, a.0.chars().count(), a.1.chars().count())).unwrap_or(std::cmp::Ordering::Equal)
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

/// Undoes (or, with `inverse` false, applies) llama.cpp's Q/K row permutation: its llama
/// converter interleaves the two rotary halves of each head (`permute` in
/// convert_hf_to_gguf.py). Rows `[heads * head_dim]`, any trailing dimensions.
pub fn permute_qk(t: &Tensor, heads: i64, to_gguf: bool) -> Tensor {
    let shape = t.size();
    let rows = shape[0];
    let rest: Vec<i64> = shape[1..].to_vec();
    let half = rows / heads / 2;
    let (a, b) = if to_gguf { (2, half) } else { (half, 2) };
    let mut view = vec![heads, a, b];
    view.extend(&rest);
    t.reshape(view.as_slice()).transpose(1, 2).contiguous().reshape(shape.as_slice())
}

/// The Hugging Face name of a GGUF tensor (llama family or GPT-2), or `None` for entries
/// that are not parameters.
fn hf_name(gguf: &str, cfg: &ModelConfig) -> Option<String> {
    let spec = cfg.spec();
    let gpt2 = spec.positions == Positions::Learned;
    let top = |n: &str| Some(format!("{}.{n}", spec.body));
    match gguf {
        "token_embd.weight" => return top(&format!("{}.weight", spec.embed)),
        "position_embd.weight" => return top("wpe.weight"),
        "output.weight" => return Some("lm_head.weight".into()),
        "output_norm.weight" => return top(&format!("{}.weight", spec.final_norm)),
        "output_norm.bias" => return top(&format!("{}.bias", spec.final_norm)),
        "rope_freqs.weight" => return None,
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let hf_module = match (module, gpt2) {
        ("attn_norm", _) => spec.norm_attn.to_string(),
        ("ffn_norm", _) => spec.norm_mlp.to_string(),
        ("attn_q", false) => "self_attn.q_proj".into(),
        ("attn_k", false) => "self_attn.k_proj".into(),
        ("attn_v", false) => "self_attn.v_proj".into(),
        ("attn_output", false) => "self_attn.o_proj".into(),
        ("attn_q_norm", false) => "self_attn.q_norm".into(),
        ("attn_k_norm", false) => "self_attn.k_norm".into(),
        ("ffn_gate", false) => "mlp.gate_proj".into(),
        ("ffn_up", false) => "mlp.up_proj".into(),
        ("ffn_down", false) => "mlp.down_proj".into(),
        ("attn_qkv", true) => "attn.c_attn".into(),
        ("attn_output", true) => "attn.c_proj".into(),
        ("ffn_up", true) => "mlp.c_fc".into(),
        ("ffn_down", true) => "mlp.c_proj".into(),
        _ => return Some(format!("<unknown>{gguf}")),
    };
    Some(format!("{}{layer}.{hf_module}.{param}", spec.layer_prefix()))
}

/// Every parameter of a GGUF model, dequantised to f32 (in parallel across tensors), under its
/// Hugging Face name and layout.
pub fn hf_tensors(g: &GgufFile, cfg: &ModelConfig) -> Result<HashMap<String, Tensor>> {
    let unpermute = g.architecture()? == "llama";
    let gpt2 = cfg.spec().positions == Positions::Learned;
    let wanted: Vec<(&crate::model::gguf::TensorInfo, String)> =
        g.tensors.iter().filter_map(|t| hf_name(&t.name, cfg).map(|n| (t, n))).collect();
    if let Some((t, _)) = wanted.iter().find(|(_, n)| n.starts_with("<unknown>")) {
        bail!("{}: tensor `{}` has no Hugging Face counterpart in a {} model", g.path.display(), t.name, cfg.arch.model_type());
    }
    let values: Vec<(String, Vec<i64>, Vec<f32>)> = wanted
        .par_iter()
        .map(|(t, name)| Ok((name.clone(), t.shape(), g.dequantize(t)?)))
        .collect::<Result<_>>()?;
    let mut out = HashMap::new();
    for (name, shape, data) in values {
        let mut t = Tensor::from_slice(&data).reshape(shape.as_slice()).to_kind(Kind::Float);
        let is_q = name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.q_proj.bias");
        let is_k = name.ends_with("self_attn.k_proj.weight") || name.ends_with("self_attn.k_proj.bias");
        if unpermute && (is_q || is_k) {
            let heads = if is_q { cfg.num_heads } else { cfg.num_kv_heads };
            // The permutation reshapes by heads: a tensor the metadata does not describe is
            // refused here rather than failing inside libtorch.
            ensure!(
                shape.first() == Some(&(heads * cfg.head_dim)) && cfg.head_dim % 2 == 0,
                "{}: `{name}` has {} rows, but the metadata says {heads} heads of {}",
                g.path.display(),
                shape.first().unwrap_or(&0),
                cfg.head_dim
            );
            t = permute_qk(&t, heads, false);
        }
        // GPT-2's Conv1D weights are [in, out]; GGUF stores every matrix as Linear's [out, in].
        if gpt2 && t.dim() == 2 && (name.contains(".attn.") || name.contains(".mlp.")) {
            t = t.tr().contiguous();
        }
        out.insert(name, t);
    }
    Ok(out)
}

/// The precision of exported matrices (vectors and norms stay F32, as llama.cpp keeps them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportType {
    F32,
    F16,
    BF16,
    Q8_0,
}

impl std::str::FromStr for ExportType {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<ExportType> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => ExportType::F32,
            "f16" => ExportType::F16,
            "bf16" => ExportType::BF16,
            "q8_0" => ExportType::Q8_0,
            other => bail!("--type must be f32, f16, bf16 or q8_0, got `{other}`"),
        })
    }
}

/// A GGUF file being assembled: metadata, then tensors.
struct GgufWriter {
    meta: Vec<u8>,
    n_meta: u64,
    infos: Vec<u8>,
    data: Vec<u8>,
    n_tensors: u64,
}

const ALIGN: usize = 32;

impl GgufWriter {
    fn new() -> GgufWriter {
        GgufWriter { meta: vec![], n_meta: 0, infos: vec![], data: vec![], n_tensors: 0 }
    }

    fn put_str(buf: &mut Vec<u8>, s: &str) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s.as_bytes());
    }

    fn key(&mut self, k: &str, ty: u32) {
        Self::put_str(&mut self.meta, k);
        self.meta.extend(ty.to_le_bytes());
        self.n_meta += 1;
    }

    fn u32(&mut self, k: &str, v: u64) {
        self.key(k, 4);
        self.meta.extend((v as u32).to_le_bytes());
    }

    fn f32(&mut self, k: &str, v: f64) {
        self.key(k, 6);
        self.meta.extend((v as f32).to_le_bytes());
    }

    fn bool(&mut self, k: &str, v: bool) {
        self.key(k, 7);
        self.meta.push(v as u8);
    }

    fn string(&mut self, k: &str, v: &str) {
        self.key(k, 8);
        Self::put_str(&mut self.meta, v);
    }

    fn strings(&mut self, k: &str, v: &[String]) {
        self.key(k, 9);
        self.meta.extend(8u32.to_le_bytes());
        self.meta.extend((v.len() as u64).to_le_bytes());
        for s in v {
            Self::put_str(&mut self.meta, s);
        }
    }

    fn i32s(&mut self, k: &str, v: &[i32]) {
        self.key(k, 9);
        self.meta.extend(5u32.to_le_bytes());
        self.meta.extend((v.len() as u64).to_le_bytes());
        for x in v {
            self.meta.extend(x.to_le_bytes());
        }
    }

    /// A tensor given in PyTorch shape and row-major f32 values, stored as `kind`.
    fn tensor(&mut self, name: &str, shape: &[i64], values: &[f32], kind: crate::model::gguf::GgmlType) {
        use crate::model::gguf::GgmlType;
        use half::{bf16, f16};
        Self::put_str(&mut self.infos, name);
        self.infos.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            self.infos.extend((*d as u64).to_le_bytes());
        }
        self.infos.extend(kind.id().to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        match kind {
            GgmlType::F32 => values.iter().for_each(|v| self.data.extend(v.to_le_bytes())),
            GgmlType::F16 => values.iter().for_each(|v| self.data.extend(f16::from_f32(*v).to_le_bytes())),
            GgmlType::BF16 => values.iter().for_each(|v| self.data.extend(bf16::from_f32(*v).to_le_bytes())),
            GgmlType::Q8_0 => self.data.extend(crate::model::gguf::quantize_q8_0(values)),
            other => unreachable!("export does not write {other:?}"),
        }
        self.data.resize(self.data.len().div_ceil(ALIGN) * ALIGN, 0);
        self.n_tensors += 1;
    }

    fn finish(self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_meta.to_le_bytes());
        out.extend(self.meta);
        out.extend(self.infos);
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        out.extend(self.data);
        out
    }
}

/// llama.cpp's name for a byte-level BPE pre-tokenizer, read off tokenizer.json.
fn pre_name(tokenizer: &Value) -> Result<&'static str> {
    let pre = &tokenizer["pre_tokenizer"];
    let is_byte_level = |v: &Value| v["type"] == "ByteLevel";
    if is_byte_level(pre) && pre["use_regex"] != false {
        return Ok("gpt-2");
    }
    if pre["type"] == "Sequence" {
        let parts = pre["pretokenizers"].as_array().map(Vec::as_slice).unwrap_or_default();
        match parts {
            [d, b] if d["type"] == "Digits" && d["individual_digits"] == true && is_byte_level(b) => return Ok("smollm"),
            [s, b] if s["type"] == "Split" && is_byte_level(b) => {
                let re = s["pattern"]["Regex"].as_str().unwrap_or_default();
                for name in ["llama-bpe", "qwen2"] {
                    if pre_split(name) == Some(re) {
                        return Ok(name);
                    }
                }
            }
            _ => {}
        }
    }
    bail!("tokenizer.json's pre-tokenizer ({}) has no llama.cpp name this exporter knows (gpt-2, smollm, llama-bpe, qwen2)", pre)
}

/// Writes a Hugging Face checkpoint (llama, qwen2 or qwen3, byte-level BPE tokenizer) as GGUF.
pub fn export_gguf(cfg: &ModelConfig, tensors: &HashMap<String, Tensor>, tokenizer: &Value, tokenizer_config: &Value, ty: ExportType) -> Result<Vec<u8>> {
    use crate::model::gguf::GgmlType;
    let arch = match cfg.arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
        Arch::Gpt2 => bail!("GGUF export supports llama, mistral, qwen2 and qwen3 students (got gpt2)"),
    };
    ensure!(tokenizer["model"]["type"] == "BPE", "GGUF export needs a BPE tokenizer.json");
    let mut w = GgufWriter::new();
    w.string("general.architecture", arch);
    w.string("general.name", "distillery student");
    let k = |s: &str| format!("{arch}.{s}");
    w.u32(&k("vocab_size"), cfg.vocab_size as u64);
    w.u32(&k("context_length"), cfg.max_position_embeddings as u64);
    w.u32(&k("embedding_length"), cfg.hidden_size as u64);
    w.u32(&k("block_count"), cfg.num_layers as u64);
    w.u32(&k("feed_forward_length"), cfg.intermediate_size as u64);
    w.u32(&k("attention.head_count"), cfg.num_heads as u64);
    w.u32(&k("attention.head_count_kv"), cfg.num_kv_heads as u64);
    w.u32(&k("attention.key_length"), cfg.head_dim as u64);
    w.u32(&k("attention.value_length"), cfg.head_dim as u64);
    w.u32(&k("rope.dimension_count"), cfg.head_dim as u64);
    w.f32(&k("rope.freq_base"), cfg.rope_theta);
    w.f32(&k("attention.layer_norm_rms_epsilon"), cfg.norm_eps);
    // The tokenizer: every id up to the embedding rows, with its type.
    let n = cfg.vocab_size as usize;
    let mut toks: Vec<Option<String>> = vec![None; n];
    let mut types = vec![1i32; n];
    for (t, id) in tokenizer["model"]["vocab"].as_object().context("tokenizer.json has no vocab")? {
        let id = id.as_u64().context("a vocab id is not a number")? as usize;
        ensure!(id < n, "tokenizer id {id} is beyond the model's {n} embeddings");
        toks[id] = Some(t.clone());
    }
    for a in tokenizer["added_tokens"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let id = a["id"].as_u64().context("an added token has no id")? as usize;
        ensure!(id < n, "added token id {id} is beyond the model's {n} embeddings");
        toks[id] = Some(a["content"].as_str().unwrap_or_default().to_string());
        types[id] = if a["special"] == true { 3 } else { 4 };
    }
    let toks: Vec<String> = toks
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5; // UNUSED: rows the tokenizer never produces
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = tokenizer["model"]["merges"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            Value::Array(p) => p.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "),
            _ => String::new(),
        })
        .collect();
    w.string("tokenizer.ggml.model", "gpt2");
    w.string("tokenizer.ggml.pre", tokenizer_config["gguf_pre_tokenizer"].as_str().map_or_else(|| pre_name(tokenizer).map(String::from), |p| Ok(p.to_string()))?.as_str());
    w.strings("tokenizer.ggml.tokens", &toks);
    w.i32s("tokenizer.ggml.token_type", &types);
    w.strings("tokenizer.ggml.merges", &merges);
    let id_of = |key: &str| -> Option<u64> {
        let name = match &tokenizer_config[key] {
            Value::String(s) => Some(s.as_str()),
            v => v["content"].as_str(),
        }?;
        toks.iter().position(|t| t == name).map(|i| i as u64)
    };
    let bos = cfg.bos_token_id.map(|i| i as u64).or_else(|| id_of("bos_token"));
    let eos = cfg.eos_token_ids.first().map(|&i| i as u64).or_else(|| id_of("eos_token"));
    let pad = cfg.pad_token_id.map(|i| i as u64).or_else(|| id_of("pad_token"));
    for (key, v) in [("bos_token_id", bos), ("eos_token_id", eos), ("padding_token_id", pad)] {
        if let Some(v) = v {
            w.u32(&format!("tokenizer.ggml.{key}"), v);
        }
    }
    // Whether encode adds BOS: what tokenizer.json's post-processor does.
    let post = tokenizer["post_processor"].to_string();
    let adds_bos = bos.is_some_and(|b| post.contains(&format!("\"ids\":[{b}]")) && post.contains("SpecialToken"));
    w.bool("tokenizer.ggml.add_bos_token", adds_bos);
    w.bool("tokenizer.ggml.add_eos_token", false);
    if let Some(t) = tokenizer_config["chat_template"].as_str() {
        w.string("tokenizer.chat_template", t);
    }
    // Llama 3 rope scaling travels as llama.cpp's per-frequency factors, before the blocks.
    if let Some(sc) = &cfg.rope_llama3 {
        let f: Vec<f32> = llama3_factors(sc, cfg.rope_theta, cfg.head_dim as usize).into_iter().map(|x| x as f32).collect();
        w.tensor("rope_freqs.weight", &[f.len() as i64], &f, GgmlType::F32);
    }
    // Tensors, in llama.cpp's names and layout.
    let spec = cfg.spec();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort_by_key(|n| gguf_order(n));
    for hf in names {
        let Some(name) = gguf_name(hf, &spec.layer_prefix()) else {
            bail!("tensor `{hf}` has no GGUF name");
        };
        let mut t = tensors[hf].to_kind(Kind::Float).contiguous();
        if arch == "llama" && (hf.contains("self_attn.q_proj.")) {
            t = permute_qk(&t, cfg.num_heads, true);
        } else if arch == "llama" && hf.contains("self_attn.k_proj.") {
            t = permute_qk(&t, cfg.num_kv_heads, true);
        }
        let shape = t.size();
        let values = Vec::<f32>::try_from(t.view([-1]))?;
        let kind = match (ty, shape.len()) {
            (_, 1) | (ExportType::F32, _) => GgmlType::F32,
            (ExportType::F16, _) => GgmlType::F16,
            (ExportType::BF16, _) => GgmlType::BF16,
            // Q8_0 blocks run along rows of 32; narrower rows stay F16.
            (ExportType::Q8_0, _) if shape[shape.len() - 1] % 32 == 0 => GgmlType::Q8_0,
            (ExportType::Q8_0, _) => GgmlType::F16,
        };
        w.tensor(&name, &shape, &values, kind);
    }
    Ok(w.finish())
}

/// Embeddings first, then blocks in order, then the output: llama.cpp's usual order.
fn gguf_order(hf: &str) -> (usize, usize, String) {
    let layer = hf.split('.').find_map(|p| p.parse::<usize>().ok());
    match layer {
        Some(l) => (1, l, hf.to_string()),
        None if hf.contains("embed") => (0, 0, hf.to_string()),
        None => (2, 0, hf.to_string()),
    }
}

/// llama.cpp's name of a (llama-family) Hugging Face tensor.
fn gguf_name(hf: &str, layer_prefix: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix(layer_prefix)?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{param}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(factor: f64, low: f64, high: f64, original: f64, theta: f64, head_dim: usize) {
        let sc = Llama3RopeScaling { factor, low_freq_factor: low, high_freq_factor: high, original_max_position_embeddings: original };
        let f = llama3_factors(&sc, theta, head_dim);
        // The fit is told another original context: the thresholds, not the split, matter.
        let fit = llama3_from_factors(&f, theta, head_dim, 8192.0).unwrap().unwrap();
        for (a, b) in f.iter().zip(llama3_factors(&fit, theta, head_dim)) {
            assert!((a - b).abs() < 1e-9 * a, "{sc:?} -> {fit:?}");
        }
    }

    #[test]
    fn llama3_scaling_survives_the_trip_through_rope_freqs() {
        // Llama 3.1 8B: many blended frequencies.
        round_trip(8.0, 1.0, 4.0, 8192.0, 500000.0, 128);
        // Tiny heads (wavelengths 6.3, 20, 63, 199, 628, 1987, ...): two, no and one blended.
        round_trip(8.0, 1.0, 8.0, 1024.0, 10000.0, 16);
        round_trip(4.0, 2.0, 3.0, 1024.0, 10000.0, 16);
        round_trip(4.0, 1.0, 2.0, 300.0, 10000.0, 16);
        assert!(llama3_from_factors(&[1.0; 8], 10000.0, 16, 8192.0).unwrap().is_none());
        let e = llama3_from_factors(&[1.0, 3.0, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0], 10000.0, 16, 8192.0).unwrap_err().to_string();
        assert!(e.contains("does not follow Llama 3"), "{e}");
    }
}
