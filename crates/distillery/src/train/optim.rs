//! AdamW as `torch.optim.AdamW` computes it, with state that can be saved and restored
//! bit for bit, plus warmup-then-cosine learning rates and global-norm gradient clipping.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

pub struct AdamW {
    /// (name, parameter, decays?)
    params: Vec<(String, Tensor, bool)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    pub step: i64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    /// Norm weights and biases (1-D parameters) get no weight decay.
    pub fn new(params: Vec<(String, Tensor)>, weight_decay: f64) -> AdamW {
        let params: Vec<(String, Tensor, bool)> =
            params.into_iter().map(|(n, p)| { let decay = p.dim() >= 2; (n, p, decay) }).collect();
        let zeros = |p: &Tensor| Tensor::zeros_like(p).to_kind(Kind::Float);
        AdamW {
            exp_avg: params.iter().map(|(_, p, _)| zeros(p)).collect(),
            exp_avg_sq: params.iter().map(|(_, p, _)| zeros(p)).collect(),
            params,
            step: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }

    pub fn params(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.iter().map(|(n, p, _)| (n.as_str(), p))
    }

    pub fn zero_grad(&mut self) {
        for (_, p, _) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Multiplies every gradient by `factor` (undoing a loss scale).
    pub fn scale_grads(&mut self, factor: f64) {
        tch::no_grad(|| {
            for (_, p, _) in &self.params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(factor);
                }
            }
        });
    }

    /// Global L2 norm of all gradients; scales them down to `max_norm` when above it
    /// (as `clip_grad_norm_`). Returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p, _)| p.grad()).filter(|g| g.defined()).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).norm()).collect();
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        if max_norm > 0.0 {
            let coef = (max_norm / (total + 1e-6)).min(1.0);
            if coef < 1.0 {
                tch::no_grad(|| {
                    for mut g in grads {
                        let _ = g.g_mul_scalar_(coef);
                    }
                });
            }
        }
        total
    }

    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        tch::no_grad(|| {
            for (i, (_, p, decay)) in self.params.iter_mut().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(Kind::Float);
                if *decay && self.weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let m = &mut self.exp_avg[i];
                let _ = m.g_mul_scalar_(self.beta1);
                let _ = m.g_add_(&(&g * (1.0 - self.beta1)));
                let v = &mut self.exp_avg_sq[i];
                let _ = v.g_mul_scalar_(self.beta2);
                let _ = v.g_add_(&(&g * &g * (1.0 - self.beta2)));
                let denom = (v.sqrt() / bc2.sqrt()).g_add_scalar(self.eps);
                let update = (&*m / denom) * (lr / bc1);
                let _ = p.g_sub_(&update.to_kind(p.kind()));
            }
        });
    }

    /// Named state tensors for a checkpoint: `exp_avg.<name>`, `exp_avg_sq.<name>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        for (i, (n, _, _)) in self.params.iter().enumerate() {
            out.push((format!("exp_avg.{n}"), self.exp_avg[i].shallow_clone()));
            out.push((format!("exp_avg_sq.{n}"), self.exp_avg_sq[i].shallow_clone()));
        }
        out
    }

    pub fn load_state(&mut self, tensors: &std::collections::HashMap<String, Tensor>, step: i64) -> anyhow::Result<()> {
        tch::no_grad(|| -> anyhow::Result<()> {
            for (i, (n, _, _)) in self.params.iter().enumerate() {
                for (prefix, dst) in [("exp_avg", &mut self.exp_avg[i]), ("exp_avg_sq", &mut self.exp_avg_sq[i])] {
                    let key = format!("{prefix}.{n}");
                    let src = tensors.get(&key).ok_or_else(|| anyhow::anyhow!("training state lacks `{key}`"))?;
                    dst.copy_(&src.to_device(dst.device()));
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

/// Linear warmup to `lr`, then cosine decay to `lr * min_ratio` at `total` steps.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Schedule {
    pub lr: f64,
    pub warmup: i64,
    pub total: i64,
    pub min_ratio: f64,
}

impl Schedule {
    /// Learning rate for optimizer step `step` (0-based).
    pub fn lr_at(&self, step: i64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (self.total - self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// One scalar AdamW step written out by hand, as torch.optim.AdamW's formulas give it.
    fn reference_step(p: f64, g: f64, m: f64, v: f64, t: i32, lr: f64, wd: f64) -> (f64, f64, f64) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        let p = p * (1.0 - lr * wd);
        let m = b1 * m + (1.0 - b1) * g;
        let v = b2 * v + (1.0 - b2) * g * g;
        let denom = (v.sqrt() / (1.0 - b2.powi(t)).sqrt()) + eps;
        (p - lr / (1.0 - b1.powi(t)) * m / denom, m, v)
    }

    #[test]
    fn adamw_matches_the_torch_formulas_with_decay_only_on_matrices() {
        let w = Tensor::from_slice(&[0.5f64, -1.0, 2.0, 0.25]).view([2, 2]).to_kind(Kind::Float).set_requires_grad(true);
        let b = Tensor::from_slice(&[0.5f64, -1.0]).to_kind(Kind::Float).set_requires_grad(true);
        let mut opt = AdamW::new(vec![("w".into(), w.shallow_clone()), ("b".into(), b.shallow_clone())], 0.1);
        let grads = [[0.3, -0.2, 0.1, 0.05], [-0.4, 0.2, 0.3, -0.1], [0.0, 0.5, -0.5, 0.2]];
        let (mut pw, mut mw, mut vw) = (vec![0.5, -1.0, 2.0, 0.25], vec![0.0; 4], vec![0.0; 4]);
        let (mut pb, mut mb, mut vb) = (vec![0.5, -1.0], vec![0.0; 2], vec![0.0; 2]);
        for (t, g) in grads.iter().enumerate() {
            let lr = 0.01 * (t + 1) as f64;
            // Gradients: the w entries, and the first two again for b.
            let loss = (&w * Tensor::from_slice(g).view([2, 2]).to_kind(Kind::Float)).sum(Kind::Float)
                + (&b * Tensor::from_slice(&g[..2]).to_kind(Kind::Float)).sum(Kind::Float);
            loss.backward();
            opt.step(lr);
            opt.zero_grad();
            for i in 0..4 {
                (pw[i], mw[i], vw[i]) = reference_step(pw[i], g[i], mw[i], vw[i], t as i32 + 1, lr, 0.1);
            }
            for i in 0..2 {
                (pb[i], mb[i], vb[i]) = reference_step(pb[i], g[i], mb[i], vb[i], t as i32 + 1, lr, 0.0);
            }
        }
        let got_w = Vec::<f64>::try_from(w.detach().to_kind(Kind::Double).view([-1])).unwrap();
        let got_b = Vec::<f64>::try_from(b.detach().to_kind(Kind::Double)).unwrap();
        for (a, e) in got_w.iter().zip(&pw).chain(got_b.iter().zip(&pb)) {
            assert!((a - e).abs() < 1e-6, "{a} vs {e}");
        }
        assert_eq!(opt.step, 3);
    }

    #[test]
    fn clipping_scales_every_gradient_by_the_global_norm() {
        let a = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::zeros([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let loss = (&a * Tensor::from_slice(&[3.0f32, 0.0])).sum(Kind::Float) + (&b * Tensor::from_slice(&[4.0f32])).sum(Kind::Float);
        loss.backward();
        let mut opt = AdamW::new(vec![("a".into(), a.shallow_clone()), ("b".into(), b.shallow_clone())], 0.0);
        let norm = opt.clip_grad_norm(1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        let ga = Vec::<f64>::try_from(a.grad().to_kind(Kind::Double)).unwrap();
        let gb = Vec::<f64>::try_from(b.grad().to_kind(Kind::Double)).unwrap();
        assert!((ga[0] - 0.6).abs() < 1e-5 && (gb[0] - 0.8).abs() < 1e-5, "{ga:?} {gb:?}");
    }

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let s = Schedule { lr: 1.0, warmup: 4, total: 12, min_ratio: 0.1 };
        assert_eq!(s.lr_at(0), 0.25);
        assert_eq!(s.lr_at(3), 1.0);
        assert!((s.lr_at(4) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(8) - 0.55).abs() < 1e-12); // halfway: floor + half the range
        assert!((s.lr_at(12) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(50) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn saved_state_restores_the_same_next_step() {
        let make = || Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]).set_requires_grad(true);
        let grad = Tensor::from_slice(&[0.1f32, -0.2, 0.3, -0.4]).view([2, 2]);
        let (p1, p2) = (make(), make());
        let mut o1 = AdamW::new(vec![("p".into(), p1.shallow_clone())], 0.01);
        for _ in 0..2 {
            (&p1 * &grad).sum(Kind::Float).backward();
            o1.step(0.1);
            o1.zero_grad();
        }
        let saved: std::collections::HashMap<String, Tensor> = o1.state_tensors().into_iter().map(|(n, t)| (n, t.copy())).collect();
        tch::no_grad(|| p2.shallow_clone().copy_(&p1));
        let mut o2 = AdamW::new(vec![("p".into(), p2.shallow_clone())], 0.01);
        o2.load_state(&saved, o1.step).unwrap();
        for (p, o) in [(&p1, &mut o1), (&p2, &mut o2)] {
            (p * &grad).sum(Kind::Float).backward();
            o.step(0.1);
        }
        assert!(p1.equal(&p2), "a restored optimizer must take the same step");
    }
}
