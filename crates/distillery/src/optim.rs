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
