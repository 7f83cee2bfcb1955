//! Reduced precision is real and right: a bf16 (and f16, loss-scaled) training step on the CPU
//! gives the fp32 step's gradients, at a vocabulary (32k) where fp16 logit gradients would
//! underflow, with logits KD, hidden-state and attention-map matching all on.
//!
//! `DISTILLERY_MP_DEVICE=cuda DISTILLERY_MP_VOCAB=128256` runs the same comparison on a GPU at
//! Llama 3's vocabulary (scripts/gpu_check.py does, with this test's binary carried over).
use distillery::model::checkpoint::save_pretrained;
use distillery::model::{CausalLm, InitMode};
use distillery::train::trainer::{DistillConfig, Trainer};
use distillery::ModelConfig;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The tests of this file take turns: libtorch's random generator is global, and a trainer
/// draws its projections' initial weights from it after seeding it.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn vocab() -> i64 {
    std::env::var("DISTILLERY_MP_VOCAB").ok().and_then(|v| v.parse().ok()).unwrap_or(32768)
}

/// The device the comparison runs on. Resolving it loads libtorch's CUDA library for a GPU,
/// which must happen before the first `manual_seed` (libtorch keeps its first answer about CUDA).
fn device() -> String {
    let d = std::env::var("DISTILLERY_MP_DEVICE").unwrap_or_else(|_| "cpu".into());
    distillery::base::device::parse_device(&d).unwrap();
    d
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("distillery-mp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A word-level tokenizer over `w0 .. w{vocab-1}`.
fn tokenizer() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..vocab()).map(|i| (format!("w{i}"), json!(i))).collect();
    json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
           "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}})
}

fn model(dir: &Path, layers: i64, hidden: i64, seed: i64) -> String {
    let cfg = json!({"model_type": "llama", "vocab_size": vocab(), "hidden_size": hidden, "intermediate_size": 2 * hidden,
                     "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 128, "initializer_range": 0.05, "tie_word_embeddings": false});
    tch::manual_seed(seed);
    let m = CausalLm::new(ModelConfig::from_json(cfg).unwrap(), Device::Cpu, Kind::Float, InitMode::Random);
    save_pretrained(&m, dir, None, &[]).unwrap();
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&tokenizer()).unwrap()).unwrap();
    dir.display().to_string()
}

/// A scratch folder with a teacher (4 layers, hidden 96), a narrower student (2 layers,
/// hidden 64: the hidden matching goes through the learned projection) and 16 records of 40
/// random words drawn with `data_seed`: (folder, teacher, student, records).
fn fixture(name: &str, data_seed: u64) -> (PathBuf, String, String, PathBuf) {
    device();
    let root = scratch(name);
    let teacher = model(&root.join("teacher"), 4, 96, 0);
    let student = model(&root.join("student"), 2, 64, 1);
    let data = root.join("train.jsonl");
    let mut rng = distillery::base::rng::SplitMix64::for_key(data_seed, 0);
    let lines: Vec<String> = (0..16)
        .map(|i| {
            let words: Vec<String> = (0..40).map(|_| format!("w{}", rng.below(vocab() as usize))).collect();
            json!({"id": format!("r{i}"), "text": words.join(" ")}).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    (root, teacher, student, data)
}

fn config(root: &Path, teacher: &str, student: &str, data: &Path, dtype: &str) -> DistillConfig {
    serde_json::from_value(json!({
        "teacher": teacher, "student": student, "data": data, "out": root.join(format!("out-{dtype}")),
        "steps": 1, "alpha": 0.5, "beta": 0.5, "temperature": 2.0, "divergence": {"kind": "forward-kl"},
        "hidden_weight": 1.0, "hidden_metric": "mse", "attn_weight": 1.0, "layer_map": "uniform",
        "batch_size": 4, "grad_accum": 2, "seq_len": 48, "lr": 1e-3, "min_lr_ratio": 0.1, "warmup": 0,
        "weight_decay": 0.0, "clip": 1.0, "eval_data": null, "eval_every": 0, "save_every": 0, "log_every": 1,
        "teacher_logits": null, "schedule": "standard", "phase_steps": null, "include_prompt_loss": false,
        "chunk": 0, "seed": 3, "device": device(), "dtype": dtype
    }))
    .unwrap()
}

fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double).view([-1]), b.to_kind(Kind::Double).view([-1]));
    (a.dot(&b) / (a.norm() * b.norm())).double_value(&[])
}

fn norm(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).norm().double_value(&[])
}

#[test]
fn reduced_precision_steps_give_the_fp32_gradients() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (root, teacher, student, data) = fixture("grads", 7);

    let grads = |dtype: &str| -> HashMap<String, Tensor> {
        let mut t = Trainer::setup(config(&root, &teacher, &student, &data, dtype), false).unwrap();
        let (sums, g) = t.step_gradients(0).unwrap();
        assert!(sums.ce.is_finite() && sums.kd > 0.0 && sums.hidden > 0.0 && sums.attn > 0.0, "{dtype}: {sums:?}");
        g.into_iter().collect()
    };
    let dev = distillery::base::device::parse_device(&device()).unwrap();
    let path = if distillery::base::gemm::bf16_gemm_accumulates_in_fp32(dev) { "one bf16 GEMM accumulating into fp32" } else { "an fp32 GEMM" };
    eprintln!("gradient path: a bf16 head's own gradient is {path} on {}", device());
    let want = grads("f32");
    for dtype in ["bf16", "f16"] {
        let got = grads(dtype);
        assert_eq!(got.len(), want.len(), "{dtype}: the same parameters get gradients");
        for name in ["lm_head.weight", "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "proj.0.weight"] {
            let (g, w) = (&got[name], &want[name]);
            assert_eq!(g.kind(), Kind::Float, "{dtype} {name}: master gradients are fp32");
            let (c, r) = (cosine(g, w), norm(g) / norm(w));
            eprintln!("gradient {dtype} {name}: cosine {c:.5}, norm ratio {r:.4}");
            assert!(c > 0.99, "{dtype} {name}: cosine {c} to the fp32 gradient");
            assert!((r - 1.0).abs() < 0.05, "{dtype} {name}: norm ratio {r}");
        }
        // The head gradient's smallest entries (off-target probabilities of about 1/V over
        // the token count) survive: nothing that is nonzero in fp32 became zero.
        let (g, w) = (&got["lm_head.weight"], &want["lm_head.weight"]);
        let lost = w.ne(0.0).logical_and(&g.eq(0.0)).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(lost, 0, "{dtype}: {lost} head-gradient entries underflowed to zero");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// `--gradient-checkpointing` (layers recomputed in the backward pass) gives the gradients of
/// the plain step, in fp32 and in bf16, with every loss term on and two micro-batches.
#[test]
fn checkpointed_steps_give_the_plain_gradients() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (root, teacher, student, data) = fixture("checkpointed", 9);
    for dtype in ["f32", "bf16"] {
        let grads = |checkpointed: bool| -> HashMap<String, Tensor> {
            let mut cfg = config(&root, &teacher, &student, &data, dtype);
            cfg.gradient_checkpointing = checkpointed;
            cfg.out = root.join(format!("out-{dtype}-{checkpointed}"));
            let mut t = Trainer::setup(cfg, false).unwrap();
            let (sums, g) = t.step_gradients(0).unwrap();
            assert!(sums.kd > 0.0 && sums.hidden > 0.0 && sums.attn > 0.0, "{dtype}: {sums:?}");
            g.into_iter().collect()
        };
        let (plain, checkpointed) = (grads(false), grads(true));
        // Every parameter has a (bound) gradient either way; the same ones must be reached.
        let reached = |g: &HashMap<String, Tensor>| {
            let mut names: Vec<String> = g.iter().filter(|(_, t)| t.abs().max().double_value(&[]) > 0.0).map(|(n, _)| n.clone()).collect();
            names.sort();
            names
        };
        assert_eq!(reached(&plain), reached(&checkpointed), "{dtype}: the same parameters get gradients");
        assert_eq!(reached(&plain).len(), plain.len(), "{dtype}: every parameter gets a gradient");
        for (name, want) in &plain {
            let got = &checkpointed[name];
            let (c, r) = (cosine(got, want), norm(got) / norm(want));
            // In bf16 the residual stream's gradient is summed in another order (a layer's
            // output gradient arrives as one tensor), so bf16 roundings differ: far below
            // the bf16-against-fp32 differences of the test above.
            assert!(c > 0.9999 && (r - 1.0).abs() < 1e-3, "{dtype} {name}: cosine {c}, norm ratio {r}");
            if dtype == "f32" {
                let (diff, scale) = ((got - want).abs().max().double_value(&[]), want.abs().max().double_value(&[]));
                assert!(diff <= 1e-5 * scale, "{name}: differs by {diff:e} (largest entry {scale:e})");
            }
        }
    }
    std::fs::remove_dir_all(&root).unwrap();
}
