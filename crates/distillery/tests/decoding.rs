//! Incremental decoding with the KV cache, and left-padded batches, give the logits of the
//! plain full forward pass, for every architecture.
use distillery::model::causal_lm::{Capture, LayerSet};
use distillery::model::{CausalLm, InitMode};
use distillery::ModelConfig;
use serde_json::json;
use tch::{Device, Kind, Tensor};

fn tiny(model_type: &str) -> CausalLm {
    let cfg = match model_type {
        "gpt2" => json!({"model_type": "gpt2", "vocab_size": 97, "n_embd": 32, "n_layer": 2, "n_head": 4,
                         "n_positions": 64, "initializer_range": 0.2}),
        _ => json!({"model_type": model_type, "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "head_dim": if model_type == "qwen3" { 16 } else { 8 },
                    "sliding_window": 6, "initializer_range": 0.2,
                    "rope_scaling": if model_type == "llama" {
                        json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
                    } else { json!(null) }}),
    };
    tch::manual_seed(0);
    CausalLm::new(ModelConfig::from_json(cfg).unwrap(), Device::Cpu, Kind::Float, InitMode::Random)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

const ARCHS: [&str; 5] = ["llama", "mistral", "qwen2", "qwen3", "gpt2"];

#[test]
fn kv_cache_decoding_equals_full_forward() {
    for arch in ARCHS {
        let model = tiny(arch);
        let ids = Tensor::randint(97, [2, 11], (Kind::Int64, Device::Cpu));
        let full = tch::no_grad(|| model.forward(&ids, None)).unwrap();
        let mut cache = model.new_cache();
        // A 4-token prefill, then one token at a time.
        let mut steps = vec![];
        tch::no_grad(|| {
            let mut h = model.forward_hidden(&ids.narrow(1, 0, 4), None, Capture::default(), Some(&mut cache)).unwrap().hidden;
            steps.push(model.logits(&h));
            for t in 4..11 {
                h = model.forward_hidden(&ids.narrow(1, t, 1), None, Capture::default(), Some(&mut cache)).unwrap().hidden;
                steps.push(model.logits(&h));
            }
        });
        let incremental = Tensor::cat(&steps, 1);
        let d = max_diff(&full, &incremental);
        assert!(d < 1e-4, "{arch}: cached decoding differs by {d}");
    }
}

#[test]
fn left_and_right_padding_match_unpadded_rows() {
    for arch in ARCHS {
        let model = tiny(arch);
        let short = Tensor::from_slice(&[5i64, 9, 12, 40, 3]);
        let alone = tch::no_grad(|| model.forward(&short.unsqueeze(0), None)).unwrap().squeeze_dim(0);
        let pad = Tensor::zeros([3], (Kind::Int64, Device::Cpu));
        let one = Tensor::ones([5], (Kind::Int64, Device::Cpu));
        let zero = Tensor::zeros([3], (Kind::Int64, Device::Cpu));
        // Left padding (generation) and right padding (evaluation).
        let left = Tensor::cat(&[&pad, &short], 0).unsqueeze(0);
        let left_mask = Tensor::cat(&[&zero, &one], 0).unsqueeze(0);
        let right = Tensor::cat(&[&short, &pad], 0).unsqueeze(0);
        let right_mask = Tensor::cat(&[&one, &zero], 0).unsqueeze(0);
        let l = tch::no_grad(|| model.forward(&left, Some(&left_mask))).unwrap().squeeze_dim(0).narrow(0, 3, 5);
        let r = tch::no_grad(|| model.forward(&right, Some(&right_mask))).unwrap().squeeze_dim(0).narrow(0, 0, 5);
        assert!(max_diff(&alone, &l) < 1e-4, "{arch}: left padding changes logits");
        assert!(max_diff(&alone, &r) < 1e-4, "{arch}: right padding changes logits");
    }
}

#[test]
fn captured_attentions_are_distributions_and_match_sdpa_output() {
    for arch in ARCHS {
        let model = tiny(arch);
        let ids = Tensor::randint(97, [2, 9], (Kind::Int64, Device::Cpu));
        let (plain, captured) = tch::no_grad(|| {
            let plain = model.forward_hidden(&ids, None, Capture::default(), None).unwrap();
            let cap = Capture { hidden_states: true, attentions: LayerSet::all() };
            (plain, model.forward_hidden(&ids, None, cap, None).unwrap())
        });
        assert!(max_diff(&plain.hidden, &captured.hidden) < 1e-5, "{arch}: eager and sdpa paths differ");
        assert_eq!(captured.hidden_states.len(), model.num_layers() + 1);
        assert_eq!(captured.attentions.len(), model.num_layers());
        assert!(captured.attentions.iter().all(Option::is_some));
        let a = captured.attentions[0].as_ref().unwrap();
        assert_eq!(a.size(), [2, model.config.num_heads, 9, 9]);
        let sums = a.sum_dim_intlist(-1, false, Kind::Float);
        assert!(max_diff(&sums, &Tensor::ones_like(&sums)) < 1e-5);
        // Causal: nothing attends to the future.
        assert!(a.triu(1).abs().max().double_value(&[]) == 0.0);
    }
}

#[test]
fn only_the_asked_layers_capture_attention_maps() {
    let model = tiny("llama");
    assert!(model.num_layers() >= 2);
    let ids = Tensor::randint(97, [2, 9], (Kind::Int64, Device::Cpu));
    let (all, one) = tch::no_grad(|| {
        let all = model.forward_hidden(&ids, None, Capture { hidden_states: false, attentions: LayerSet::all() }, None).unwrap();
        let one = model.forward_hidden(&ids, None, Capture { hidden_states: false, attentions: LayerSet::of([1]) }, None).unwrap();
        (all, one)
    });
    let kept: Vec<bool> = one.attentions.iter().map(Option::is_some).collect();
    let mut want = vec![false; model.num_layers()];
    want[1] = true;
    assert_eq!(kept, want);
    assert!(max_diff(one.attentions[1].as_ref().unwrap(), all.attentions[1].as_ref().unwrap()) < 1e-5, "layer 0 ran SDPA instead of the eager path: only rounding may differ");
    let d = max_diff(&one.hidden, &all.hidden);
    assert!(d < 1e-5, "eager and SDPA layers differ by {d}, more than rounding");
}

#[test]
fn eager_attention_runs_in_half_precision_without_padding() {
    // Five tokens, inside the sliding window and unpadded: the plain causal mask, whose fill
    // value (f32::MIN) overflowed bf16 and f16 scores before the eager path masked in fp32.
    for kind in [Kind::BFloat16, Kind::Half] {
        let mut model = tiny("llama");
        model.vs.set_kind(kind);
        let ids = Tensor::randint(97, [2, 5], (Kind::Int64, Device::Cpu));
        let out = tch::no_grad(|| model.forward_hidden(&ids, None, Capture { hidden_states: false, attentions: LayerSet::all() }, None)).unwrap();
        let a = out.attentions[0].as_ref().unwrap();
        assert_eq!(a.kind(), kind);
        let sums = a.to_kind(Kind::Float).sum_dim_intlist(-1, false, Kind::Float);
        assert!(max_diff(&sums, &Tensor::ones_like(&sums)) < 2e-2, "{kind:?}: rows are not distributions");
        assert!(a.triu(1).abs().max().to_kind(Kind::Float).double_value(&[]) == 0.0);
    }
}
