//! Activation checkpointing changes memory, not results: a forward pass that keeps only each
//! layer's input, followed by the layer-by-layer recomputing backward pass, gives the
//! parameter gradients of the plain forward and backward passes, for every architecture, with
//! losses on the output, on a middle layer's hidden states and on a captured attention map;
//! so does recomputing only the first layers and keeping the others' graphs, or (Llama-style
//! layers) only the lean set of tensors their hand-written backward pass reads.
use distillery::model::causal_lm::{Capture, LayerSet};
use distillery::model::{CausalLm, InitMode};
use distillery::ModelConfig;
use serde_json::json;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// The tests take turns: libtorch's random generator is global, and each comparison replays
/// seeded draws (the loss weights) that a concurrent test would shift.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tiny(model_type: &str, tied: bool) -> CausalLm {
    tiny_in(model_type, tied, Kind::Float)
}

fn tiny_in(model_type: &str, tied: bool, kind: Kind) -> CausalLm {
    let cfg = match model_type {
        "gpt2" => json!({"model_type": "gpt2", "vocab_size": 97, "n_embd": 32, "n_layer": 3, "n_head": 4,
                         "n_positions": 64, "initializer_range": 0.2}),
        _ => json!({"model_type": model_type, "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
                    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "head_dim": if model_type == "qwen3" { 16 } else { 8 }, "initializer_range": 0.2,
                    "tie_word_embeddings": tied}),
    };
    tch::manual_seed(0);
    CausalLm::new(ModelConfig::from_json(cfg).unwrap(), Device::Cpu, kind, InitMode::Random)
}

/// Every parameter's gradient after one forward and backward pass of a loss that reads the
/// output, layer 1's hidden states and layer 1's attention map. Gradients accumulate into
/// whatever the parameters already hold, as in training.
/// `recompute`: `None` for the plain passes, else how many leading layers the checkpointed
/// pass recomputes.
fn gradients(model: &CausalLm, ids: &Tensor, mask: &Tensor, recompute: Option<usize>) -> BTreeMap<String, Tensor> {
    let capture = Capture { hidden_states: true, attentions: LayerSet::of([1]) };
    let checkpointed = recompute.is_some();
    let (out, saved) = if let Some(recompute) = recompute {
        let (out, saved) = model.forward_checkpointed(ids, Some(mask), capture, recompute).unwrap();
        (out, Some(saved))
    } else {
        (model.forward_hidden(ids, Some(mask), capture, None).unwrap(), None)
    };
    let (b, t) = ids.size2().unwrap();
    tch::manual_seed(1);
    let weights = Tensor::randn([b, t, 97], (Kind::Float, Device::Cpu));
    let logits = model.logits(&out.hidden);
    let probs = out.attentions[1].as_ref().expect("layer 1's map is captured");
    let loss = (logits.log_softmax(-1, Kind::Float) * weights).sum(Kind::Float)
        + out.hidden_states[2].to_kind(Kind::Float).square().mean(Kind::Float) * 3.0
        + probs.to_kind(Kind::Float).clamp_min(1e-9).log().mean(Kind::Float);
    loss.backward();
    if let Some(saved) = saved {
        model.backward_checkpointed(saved, None);
    }
    model
        .vs
        .variables()
        .into_iter()
        .map(|(n, p)| {
            let g = p.grad();
            assert!(g.defined(), "{n} got no gradient (checkpointed: {checkpointed}, recomputing {recompute:?})");
            (n, g.copy())
        })
        .collect()
}

fn zero_grads(model: &CausalLm) {
    for (_, mut p) in model.vs.variables() {
        p.zero_grad();
    }
}

#[test]
fn checkpointed_backward_gives_the_plain_gradients() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (arch, tied) in [("llama", true), ("llama", false), ("mistral", false), ("qwen2", true), ("qwen3", false), ("gpt2", true)] {
        let model = tiny(arch, tied);
        let ids = Tensor::randint(97, [2, 9], (Kind::Int64, Device::Cpu));
        // Row 1 is left-padded: the additive-mask path.
        let mask = Tensor::from_slice2(&[[1i64; 9], [0, 0, 1, 1, 1, 1, 1, 1, 1]]);
        // Checkpointed first, while no gradient exists (the embeddings' gradient is created
        // through autograd), then plain, then checkpointed again into existing gradients (the
        // embeddings' rows are added in place).
        let first = gradients(&model, &ids, &mask, Some(usize::MAX));
        zero_grads(&model);
        let plain = gradients(&model, &ids, &mask, None);
        zero_grads(&model);
        let again = gradients(&model, &ids, &mask, Some(usize::MAX));
        // Layer 0 recomputed, layers 1 (whose map is captured) and 2 kept; then none recomputed.
        zero_grads(&model);
        let partial = gradients(&model, &ids, &mask, Some(1));
        zero_grads(&model);
        let none = gradients(&model, &ids, &mask, Some(0));
        // None recomputed on a fresh model, while no gradient exists: the lean layers' weight
        // gradients are created rather than added to (Llama, Mistral, Qwen2: layers 0 and 2).
        let none_first = gradients(&tiny(arch, tied), &ids, &mask, Some(0));
        for (name, want) in &plain {
            assert!(want.defined() && want.abs().max().double_value(&[]) > 0.0, "{arch}: {name} gets a gradient");
            let scale = want.abs().max().double_value(&[]);
            let runs = [("first", &first[name]), ("in place", &again[name]), ("first layer only", &partial[name]), ("no layer", &none[name]), ("no layer, first", &none_first[name])];
            for (what, got) in runs {
                assert!(got.defined(), "{arch} {what}: {name} has no gradient");
                let diff = (got - want).abs().max().double_value(&[]);
                assert!(diff <= 1e-5 * scale, "{arch} (tied {tied}) {what}: {name} differs by {diff:e} (largest entry {scale:e})");
            }
        }
    }
}

/// In bf16 the lean layers round their gradients in another order than autograd (the
/// projections' input gradients summed in place, the weights' added by the GEMM, the norms and
/// the activation in one-pass kernels), so they agree to bf16's precision rather than to the
/// bit: every parameter's gradient points the same way (cosine) and has the same size. In f16,
/// which the kernels do not take, the elementwise parts go through autograd's small graphs (the
/// path a GPU runs): the same agreement.
#[test]
fn lean_layers_in_half_precision_give_the_plain_gradients_to_its_precision() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (arch, kind) in [("llama", Kind::BFloat16), ("qwen2", Kind::BFloat16), ("llama", Kind::Half)] {
        let model = tiny_in(arch, false, kind);
        let ids = Tensor::randint(97, [2, 9], (Kind::Int64, Device::Cpu));
        let mask = Tensor::from_slice2(&[[1i64; 9], [0, 0, 1, 1, 1, 1, 1, 1, 1]]);
        let plain = gradients(&model, &ids, &mask, None);
        zero_grads(&model);
        let lean = gradients(&model, &ids, &mask, Some(0));
        for (name, want) in &plain {
            let (want, got) = (want.to_kind(Kind::Float).reshape([-1]), lean[name].to_kind(Kind::Float).reshape([-1]));
            let (nw, ng) = (want.norm().double_value(&[]), got.norm().double_value(&[]));
            let cosine = (&want * &got).sum(Kind::Float).double_value(&[]) / (nw * ng);
            assert!(cosine > 0.999, "{arch} {kind:?}: {name}'s gradients have cosine {cosine}");
            assert!((ng / nw - 1.0).abs() < 0.01, "{arch} {kind:?}: {name}'s gradient norms {ng} and {nw}");
        }
    }
}

#[test]
fn checkpointed_forward_keeps_one_tensor_a_layer() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let model = tiny("llama", false);
    let ids = Tensor::randint(97, [2, 9], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([2, 9], (Kind::Int64, Device::Cpu));
    let (out, _saved) = model.forward_checkpointed(&ids, Some(&mask), Capture { hidden_states: true, attentions: LayerSet::default() }, usize::MAX).unwrap();
    // Every hidden state is a leaf: no layer's graph (and so none of its intermediates) is kept.
    for (i, h) in out.hidden_states.iter().enumerate() {
        assert!(h.requires_grad() && h.is_leaf(), "hidden state {i} is a leaf");
    }
    // Only the final norm's graph stands between the output and the last layer's output.
    assert!(!out.hidden.is_leaf());
    // The plain pass, which autograd records, runs libtorch's operators; the checkpointed one
    // runs without records, so its norms and activations are the one-pass CPU kernels, which
    // sum a row's squares in another order: equal to fp32's last bits.
    let plain = model.forward_hidden(&ids, Some(&mask), Capture { hidden_states: true, attentions: LayerSet::default() }, None).unwrap();
    let close = |got: &Tensor, what: &str| {
        let scale = plain.hidden.abs().max().double_value(&[]);
        let diff = (got - &plain.hidden).abs().max().double_value(&[]);
        assert!(diff <= 1e-6 * scale, "{what} computes the same outputs: {diff} of {scale}");
    };
    close(&out.hidden, "the checkpointed forward pass");
    // So do the lean layers (none recomputed): the same arithmetic, without autograd's records.
    let (lean, _saved) = model.forward_checkpointed(&ids, Some(&mask), Capture::default(), 0).unwrap();
    close(&lean.hidden, "the lean forward pass");
}
