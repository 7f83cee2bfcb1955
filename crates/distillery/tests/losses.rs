//! Loss functions against PyTorch. Golden values come from `scripts/golden_losses.py`
//! (PyTorch, float64), whose closed-form inputs are rebuilt here.
use distillery::train::losses::*;
use distillery::model::{CausalLm, InitMode};
use distillery::ModelConfig;
use serde_json::json;
use tch::{Device, Kind, Tensor};

const N: i64 = 4;
const V: i64 = 7;

fn grid() -> (Tensor, Tensor) {
    let i = Tensor::arange(N, (Kind::Double, Device::Cpu)).view([N, 1]);
    let j = Tensor::arange(V, (Kind::Double, Device::Cpu)).view([1, V]);
    (i, j)
}

/// Student logits `3 sin(0.7 i + 1.3 j)`, teacher logits `2.5 cos(0.4 i - 0.9 j + 0.3)`.
fn logits() -> (Tensor, Tensor) {
    let (i, j) = grid();
    let s = ((&i * 0.7) + (&j * 1.3)).sin() * 3.0;
    let t = ((&i * 0.4) - (&j * 0.9) + 0.3).cos() * 2.5;
    (s.to_kind(Kind::Float), t.to_kind(Kind::Float))
}

fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{what}: got {got}, PyTorch {want}");
}

fn sum(t: &Tensor) -> f64 {
    t.sum(Kind::Double).double_value(&[])
}

#[test]
fn divergences_match_pytorch() {
    let (s, t) = logits();
    let rows = Vec::<f64>::try_from(kd_dense(&s, &t, 1.0, Divergence::ForwardKl).to_kind(Kind::Double)).unwrap();
    let want = [1.2102653583631364, 0.6379420248563172, 2.333582264453765, 3.982251138599825];
    for (g, w) in rows.iter().zip(want) {
        close(*g, w, "forward KL row");
    }
    // T^2 scaling is part of these values (PyTorch: kl_div(...) * T^2).
    close(sum(&kd_dense(&s, &t, 2.0, Divergence::ForwardKl)), 11.324498875217348, "forward KL T=2");
    close(sum(&kd_dense(&s, &t, 2.0, Divergence::ReverseKl)), 10.361021811646342, "reverse KL T=2");
    close(sum(&kd_dense(&s, &t, 2.0, Divergence::Jsd { beta: 0.5 })), 2.3448679448217082, "JSD 0.5 T=2");
    close(sum(&kd_dense(&s, &t, 1.0, Divergence::Jsd { beta: 0.1 })), 0.5466780854079342, "JSD 0.1 T=1");
    close(sum(&kd_dense(&s, &t, 2.0, Divergence::SkewKl { lambda: 0.1 })), 7.950708398284687, "skew KL T=2");
    close(sum(&kd_dense(&s, &t, 2.0, Divergence::Tvd)), 7.063879447421314, "TVD T=2");
}

#[test]
fn temperature_scaling_is_t_squared() {
    // Doubling T with logits doubled leaves the distributions unchanged, so the loss grows by 4.
    let (s, t) = logits();
    let base = sum(&kd_dense(&s, &t, 1.0, Divergence::ForwardKl));
    let scaled = sum(&kd_dense(&(&s * 2.0), &(&t * 2.0), 2.0, Divergence::ForwardKl));
    close(scaled, 4.0 * base, "T^2 scaling");
}

#[test]
fn sparse_topk_kd_matches_pytorch() {
    let (s, t) = logits();
    let lp = t.log_softmax(-1, Kind::Float);
    let (top, idx) = lp.topk(3, -1, true, true);
    let tail = top.logsumexp(-1, false).exp().neg().g_add_scalar(1.0).log();
    let teacher = SparseTeacher { indices: idx, logprobs: top, tail_logmass: tail };
    close(sum(&kd_sparse(&s, &teacher, 1.0, Divergence::ForwardKl)), 7.826873981786514, "sparse T=1");
    close(sum(&kd_sparse(&s, &teacher, 2.0, Divergence::ForwardKl)), 9.220601214727303, "sparse T=2");
    // With every token in the "top k" the sparse loss is the dense one.
    let (all, idx) = lp.topk(V, -1, true, true);
    let full = SparseTeacher { indices: idx, logprobs: all, tail_logmass: Tensor::full([N], -1e30, (Kind::Float, Device::Cpu)) };
    close(sum(&kd_sparse(&s, &full, 1.0, Divergence::ForwardKl)), sum(&kd_dense(&s, &t, 1.0, Divergence::ForwardKl)), "sparse k=V");
}

fn hidden_inputs() -> (Tensor, Tensor, Tensor) {
    let a = Tensor::arange(30, (Kind::Double, Device::Cpu)).view([2, 3, 5]);
    let hs = (&a * 0.3).sin().to_kind(Kind::Float);
    let ht = ((&a * 0.2) + 0.5).cos().to_kind(Kind::Float);
    let valid = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 0]).view([2, 3]).ne(0);
    (hs, ht, valid)
}

#[test]
fn hidden_losses_match_pytorch_and_skip_padding() {
    let (hs, ht, valid) = hidden_inputs();
    close(sum(&hidden_loss_sum(&hs, &ht, &valid, HiddenMetric::Mse)), 1.938828582685598, "hidden MSE");
    close(sum(&hidden_loss_sum(&hs, &ht, &valid, HiddenMetric::Cosine)), 2.1904379291041187, "hidden cosine");
    close(sum(&hidden_loss_sum(&hs, &ht, &valid, HiddenMetric::NormalizedMse)), 8.81647833818925, "hidden normalized MSE");
    // Scale-free: scaling both sides leaves it unchanged.
    close(sum(&hidden_loss_sum(&(&hs * 40.0), &(&ht * 40.0), &valid, HiddenMetric::NormalizedMse)), 8.81647833818925, "normalized MSE scale");
    // Changing a padded position changes nothing.
    let hs2 = hs.copy();
    let _ = hs2.get(1).get(2).fill_(100.0);
    close(sum(&hidden_loss_sum(&hs2, &ht, &valid, HiddenMetric::Mse)), 1.938828582685598, "padding masked");
}

fn attn(heads: i64, scale: f64) -> Tensor {
    let x = Tensor::arange(2 * heads * 9, (Kind::Double, Device::Cpu)).view([2, heads, 3, 3]);
    let logits = (x * scale).sin();
    let causal = Tensor::ones([3, 3], (Kind::Bool, Device::Cpu)).tril(0);
    logits.masked_fill(&causal.logical_not(), f64::NEG_INFINITY).softmax(-1, Kind::Float)
}

#[test]
fn attention_loss_groups_teacher_heads_and_matches_pytorch() {
    let (_, _, valid) = hidden_inputs();
    let got = attention_loss_sum(&attn(2, 0.61), &attn(4, 0.37), &valid).unwrap();
    close(sum(&got), 0.10427017764703167, "attention KL");
    assert!(attention_loss_sum(&attn(3, 0.61).narrow(1, 0, 3), &attn(4, 0.37), &valid).is_err());
}

#[test]
fn cross_entropy_matches_pytorch() {
    let (s, _) = logits();
    let tgt = Tensor::from_slice(&[1i64, 5, 0, 6]);
    let ce = s.cross_entropy_loss::<Tensor>(&tgt, None, tch::Reduction::Sum, -100, 0.0);
    close(ce.double_value(&[]), 8.231681405125316, "CE");
}

#[test]
fn chunked_losses_equal_unchunked_in_value_and_gradient() {
    let cfg = ModelConfig::from_json(json!({"model_type": "llama", "vocab_size": 50, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "initializer_range": 0.5})).unwrap();
    tch::manual_seed(1);
    let student = CausalLm::new(cfg.clone(), Device::Cpu, Kind::Float, InitMode::Random);
    let teacher = CausalLm::new(cfg, Device::Cpu, Kind::Float, InitMode::Random);
    let hidden = Tensor::randn([37, 16], (Kind::Float, Device::Cpu));
    let t_hidden = Tensor::randn([37, 16], (Kind::Float, Device::Cpu));
    let targets = Tensor::randint(50, [37], (Kind::Int64, Device::Cpu));
    let run = |chunk: i64| {
        let leaf = hidden.detach().set_requires_grad(true);
        for (_, mut p) in student.vs.variables() {
            p.zero_grad();
        }
        let w = LogitLossWeights { alpha: 0.3, beta: 0.7, temperature: 2.0, divergence: Divergence::ForwardKl, chunk };
        let rows = TeacherRows::Online { model: &teacher, hidden: t_hidden.shallow_clone() };
        let sums = chunked_logit_losses(&student, &leaf, &targets, &rows, &w, 37.0, true);
        let head = student.lm_head_weight().grad().copy();
        (sums, leaf.grad().copy(), head)
    };
    let (a, ga, ha) = run(5);
    let (b, gb, hb) = run(1024);
    close(a.ce, b.ce, "chunked CE");
    close(a.kd, b.kd, "chunked KD");
    assert!((&ga - &gb).abs().max().double_value(&[]) < 1e-6, "hidden gradients differ");
    assert!((&ha - &hb).abs().max().double_value(&[]) < 1e-6, "head gradients differ");
}

#[test]
fn fused_forward_kl_path_equals_autograd() {
    let cfg = ModelConfig::from_json(json!({"model_type": "llama", "vocab_size": 50, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "initializer_range": 0.5,
        "tie_word_embeddings": true})).unwrap();
    tch::manual_seed(2);
    let student = CausalLm::new(cfg.clone(), Device::Cpu, Kind::Float, InitMode::Random);
    let teacher = CausalLm::new(cfg, Device::Cpu, Kind::Float, InitMode::Random);
    let hidden = Tensor::randn([29, 16], (Kind::Float, Device::Cpu));
    let t_hidden = Tensor::randn([29, 16], (Kind::Float, Device::Cpu));
    let targets = Tensor::randint(50, [29], (Kind::Int64, Device::Cpu));
    for (alpha, beta, temperature, with_teacher) in [(0.3, 0.7, 2.0, true), (0.5, 0.5, 1.0, true), (0.0, 1.0, 1.0, true), (1.0, 0.0, 1.0, false)] {
        let run = |fused: bool| {
            let leaf = hidden.detach().set_requires_grad(true);
            for (_, mut p) in student.vs.variables() {
                p.zero_grad();
            }
            let w = LogitLossWeights { alpha, beta, temperature, divergence: Divergence::ForwardKl, chunk: 8 };
            let rows = if with_teacher {
                TeacherRows::Online { model: &teacher, hidden: t_hidden.shallow_clone() }
            } else {
                TeacherRows::None
            };
            let sums = if fused {
                chunked_logit_losses(&student, &leaf, &targets, &rows, &w, 29.0, true)
            } else {
                chunked_logit_losses_autograd(&student, &leaf, &targets, &rows, &w, 29.0, true)
            };
            (sums, leaf.grad().copy(), student.lm_head_weight().grad().copy())
        };
        let (a, ga, ha) = run(true);
        let (b, gb, hb) = run(false);
        close(a.ce, b.ce, "fused CE");
        close(a.kd, b.kd, "fused KD");
        assert!((&ga - &gb).abs().max().double_value(&[]) < 1e-5, "hidden gradients differ");
        assert!((&ha - &hb).abs().max().double_value(&[]) < 1e-5, "head gradients differ");
    }
}
