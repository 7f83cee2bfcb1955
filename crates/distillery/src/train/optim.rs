//! AdamW as `torch.optim.AdamW` computes it, with state that can be saved and restored
//! bit for bit, plus warmup-then-cosine learning rates and global-norm gradient clipping.
use multiversion::multiversion;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// AdamW over flat buffers: the parameters of each group (decayed matrices; undecayed
/// vectors) are views into one contiguous fp32 buffer, and so are their moments, so a step
/// is a handful of kernels per group whatever the number of tensors (one launch per op on a
/// GPU instead of ~14 per parameter). The gradients become views into a flat buffer too, the
/// first time they are gathered (autograd then accumulates into them in place), so
/// `clip_grad_norm` (one norm for all of them, computed on the device) and `step` copy
/// nothing. On the CPU the update is one pass over the buffers ([`fused_update`]); elsewhere
/// it runs as libtorch operators slice by slice through one scratch buffer: no temporary as
/// large as the model is allocated (on a CPU it was freshly page-faulted every step, a tenth
/// of a SmolLM2-sized CPU step in `perf` before). The arithmetic is elementwise and the same
/// as `torch.optim.AdamW`'s, so results do not depend on the layout, the slicing or the path.
pub struct AdamW {
    /// (name, parameter), in the order given.
    params: Vec<(String, Tensor)>,
    groups: Vec<Group>,
    /// Each group's clipped flat gradients of the current step, once gathered.
    pending: Option<Vec<Tensor>>,
    /// The update's one temporary, a slice long (allocated at the first step).
    scratch: Option<Tensor>,
    pub step: i64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct Group {
    decay: bool,
    /// Indices into `params`.
    members: Vec<usize>,
    /// Where each member starts in the group's flat buffers.
    offsets: Vec<i64>,
    flat: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The flat gradients the members' `.grad` are views into, once gathered.
    grad: Option<Tensor>,
}

/// Elements per slice of the update: 16 MiB of fp32 on a CPU, 256 MiB on a GPU (where each
/// slice costs kernel launches).
fn update_slice(device: tch::Device) -> i64 {
    if device.is_cuda() {
        1 << 26
    } else {
        1 << 22
    }
}

/// The L2 norm of a flat fp32 tensor, as an fp64 scalar on its device, accurate at any length.
/// One ATen reduction over a long fp32 tensor drifts low as it grows: 0.46% at 57M elements
/// (the gradients of SmolLM2's 8-layer copy; fp64 gives 68.779, `norm()` 68.462). Rows of
/// 2^16 elements are each reduced accurately (2e-6 there) in one kernel, then combined in fp64.
fn accurate_norm(flat: &Tensor) -> Tensor {
    const ROW: i64 = 1 << 16;
    let n = flat.numel() as i64;
    let rows = n / ROW;
    let mut parts = vec![];
    if rows > 0 {
        parts.push(flat.narrow(0, 0, rows * ROW).view([rows, ROW]).norm_scalaropt_dim(2, [1], false).to_kind(Kind::Double));
    }
    if n > rows * ROW {
        parts.push(flat.narrow(0, rows * ROW, n - rows * ROW).norm().to_kind(Kind::Double).view([1]));
    }
    if parts.is_empty() {
        return Tensor::zeros([], (Kind::Double, flat.device()));
    }
    Tensor::cat(&parts, 0).norm()
}

/// The scalars of one AdamW step as its operators read them: libtorch rounds a scalar operand
/// of an fp32 tensor op to fp32 (`sqrt(bc2)`, `lr / bc1` and `1 - lr * wd` computed in f64
/// first, as the op sequence below passes them).
#[derive(Clone, Copy, Debug)]
struct StepScalars {
    /// `1 - lr * wd`, for the decayed group when `wd > 0`.
    decay: Option<f32>,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    sqrt_bc2: f32,
    eps: f32,
    step_size: f32,
    /// The same in f64, as the libtorch operators are given them.
    exact: [f64; 8],
}

impl StepScalars {
    #[allow(clippy::too_many_arguments)]
    fn new(b1: f64, b2: f64, eps: f64, wd: f64, lr: f64, bc1: f64, bc2: f64) -> StepScalars {
        let exact = [1.0 - lr * wd, b1, 1.0 - b1, b2, 1.0 - b2, bc2.sqrt(), eps, lr / bc1];
        let f = exact.map(|x| x as f32);
        StepScalars {
            decay: (wd > 0.0).then_some(f[0]),
            beta1: f[1],
            one_minus_beta1: f[2],
            beta2: f[3],
            one_minus_beta2: f[4],
            sqrt_bc2: f[5],
            eps: f[6],
            step_size: f[7],
            exact,
        }
    }
}

/// One slice of `p, m, v, g` (same shape) with `d`, a scratch of that shape, as libtorch
/// operators: `m = m*b1 + g*(1-b1); v = v*b2 + g*g*(1-b2); p -= m / (sqrt(v)/sqrt(bc2) + eps)
/// * (lr/bc1)`, every temporary written into `d` (decay, `p *= 1 - lr*wd`, first).
fn update_with_ops(p: &mut Tensor, m: &mut Tensor, v: &mut Tensor, g: &Tensor, d: &mut Tensor, decay: bool, s: &StepScalars) {
    let [wd, b1, c1, b2, c2, sqrt_bc2, eps, step_size] = s.exact;
    if decay && s.decay.is_some() {
        let _ = p.g_mul_scalar_(wd);
    }
    let _ = d.copy_(g);
    let _ = d.g_mul_scalar_(c1);
    let _ = m.g_mul_scalar_(b1).g_add_(d);
    let _ = g.mul_out(d, g);
    let _ = d.g_mul_scalar_(c2);
    let _ = v.g_mul_scalar_(b2).g_add_(d);
    let _ = v.sqrt_out(d);
    let _ = d.g_div_scalar_(sqrt_bc2).g_add_scalar_(eps);
    let _ = m.div_out(d, d);
    let _ = d.g_mul_scalar_(step_size);
    let _ = p.g_sub_(d);
}

/// Elements per task of the fused update: 256 KiB of each of the four buffers.
const FUSED_TASK: usize = 1 << 16;
/// Elements per block within a task: the roots of a block stay in L1 between its two passes.
const FUSED_BLOCK: usize = 1024;

/// [`update_with_ops`] in one pass over the memory, on the CPU: the same fp32 operations in
/// the same order, each rounded once (no fused multiply-add), and the square root by the MKL
/// routine libtorch's `sqrt` calls ([`crate::base::vml`]), so the results are bit-identical to
/// the operators', which made about fourteen passes over a model's worth of fp32 (0.17 s of a
/// SmolLM2-sized step against 0.04 s in one). Returns false, touching nothing, for anything but
/// contiguous fp32 CPU tensors of one length, or without MKL's square root.
fn fused_update(p: &mut Tensor, m: &mut Tensor, v: &mut Tensor, g: &Tensor, decay: bool, s: &StepScalars) -> bool {
    let n = p.numel();
    let fits = |t: &Tensor| t.device() == tch::Device::Cpu && t.kind() == Kind::Float && t.is_contiguous() && t.numel() == n;
    if !(fits(p) && fits(m) && fits(v) && fits(g) && crate::base::vml::sqrt_available()) {
        return false;
    }
    let decay = if decay { s.decay } else { None };
    // Raw addresses (usize, shared by the tasks): each task takes its own disjoint range.
    let (pa, ma, va, ga) = (p.data_ptr() as usize, m.data_ptr() as usize, v.data_ptr() as usize, g.data_ptr() as usize);
    let tasks = n.div_ceil(FUSED_TASK);
    crate::base::omp::parallel_tasks(tasks, &|i| {
        let mut roots = [0f32; FUSED_BLOCK];
        let end = n.min((i + 1) * FUSED_TASK);
        for start in (i * FUSED_TASK..end).step_by(FUSED_BLOCK) {
            let len = FUSED_BLOCK.min(end - start);
            // SAFETY: four distinct contiguous fp32 CPU buffers of `n` elements (the
            // optimizer's parameters, moments and gradients never share memory), alive for
            // this call; the tasks' ranges are disjoint.
            let at = |a: usize| unsafe { std::slice::from_raw_parts_mut((a as *mut f32).add(start), len) };
            let (p, m, v, g) = (at(pa), at(ma), at(va), &*at(ga));
            moments(m, v, g, s);
            let roots = &mut roots[..len];
            assert!(crate::base::vml::sqrt(v, roots), "MKL's sqrt was found above");
            parameters(p, m, roots, decay, s);
        }
    });
    true
}

/// `m = m*b1 + g*(1-b1); v = v*b2 + g*g*(1-b2)`, vectorised where the CPU allows.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx2+fma", "x86_64+avx2+fma"))]
fn moments(m: &mut [f32], v: &mut [f32], g: &[f32], s: &StepScalars) {
    let n = m.len();
    let (v, g) = (&mut v[..n], &g[..n]);
    for i in 0..n {
        m[i] = m[i] * s.beta1 + g[i] * s.one_minus_beta1;
        v[i] = v[i] * s.beta2 + g[i] * g[i] * s.one_minus_beta2;
    }
}

/// `p = p*(1 - lr*wd)` (decayed groups) `- m / (root/sqrt(bc2) + eps) * (lr/bc1)`.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx2+fma", "x86_64+avx2+fma"))]
fn parameters(p: &mut [f32], m: &[f32], roots: &[f32], decay: Option<f32>, s: &StepScalars) {
    let n = p.len();
    let (m, roots) = (&m[..n], &roots[..n]);
    // The decay branch outside the loop, so the loop body is branch-free.
    let step = |p: f32, i: usize| p - m[i] / (roots[i] / s.sqrt_bc2 + s.eps) * s.step_size;
    match decay {
        Some(wd) => (0..n).for_each(|i| p[i] = step(p[i] * wd, i)),
        None => (0..n).for_each(|i| p[i] = step(p[i], i)),
    }
}

/// Whether `t` is exactly the memory of `view` (same start, shape and strides).
fn same_memory(t: &Tensor, view: &Tensor) -> bool {
    t.data_ptr() == view.data_ptr() && t.size() == view.size() && t.stride() == view.stride() && t.kind() == view.kind()
}

impl Group {
    fn view(&self, buf: &Tensor, params: &[(String, Tensor)], member: usize) -> Tensor {
        let p = &params[self.members[member]].1;
        buf.narrow(0, self.offsets[member], p.numel() as i64).view(p.size().as_slice())
    }

    /// Whether `grad`, member `member`'s gradient, is already its view of the flat gradients.
    fn is_bound(&self, grad: &Tensor, params: &[(String, Tensor)], member: usize) -> bool {
        grad.defined() && self.grad.as_ref().is_some_and(|buf| same_memory(grad, &self.view(buf, params, member)))
    }
}

impl AdamW {
    /// Norm weights and biases (1-D parameters) get no weight decay. The parameters must be
    /// fp32 (the masters); from here on their storage is the optimizer's flat buffers.
    pub fn new(params: Vec<(String, Tensor)>, weight_decay: f64) -> AdamW {
        let mut groups = vec![];
        for decay in [true, false] {
            let members: Vec<usize> = (0..params.len()).filter(|&i| (params[i].1.dim() >= 2) == decay).collect();
            if members.is_empty() {
                continue;
            }
            let offsets: Vec<i64> = members
                .iter()
                .scan(0i64, |start, &i| {
                    let here = *start;
                    *start += params[i].1.numel() as i64;
                    Some(here)
                })
                .collect();
            let last = *members.last().unwrap();
            let total = offsets.last().unwrap() + params[last].1.numel() as i64;
            let device = params[members[0]].1.device();
            let zeros = || Tensor::zeros([total], (Kind::Float, device));
            let group = Group { decay, members, offsets, flat: zeros(), exp_avg: zeros(), exp_avg_sq: zeros(), grad: None };
            tch::no_grad(|| {
                for k in 0..group.members.len() {
                    let view = group.view(&group.flat, &params, k);
                    let mut p = params[group.members[k]].1.shallow_clone();
                    assert_eq!(p.kind(), Kind::Float, "AdamW keeps fp32 masters; `{}` is {:?}", params[group.members[k]].0, p.kind());
                    view.shallow_clone().copy_(&p);
                    p.set_data(&view);
                }
            });
            groups.push(group);
        }
        AdamW { params, groups, pending: None, scratch: None, step: 0, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay }
    }

    pub fn params(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.iter().map(|(n, p)| (n.as_str(), p))
    }

    pub fn zero_grad(&mut self) {
        self.pending = None;
        tch::no_grad(|| {
            for g in &self.groups {
                if let Some(buf) = &g.grad {
                    let _ = buf.shallow_clone().zero_();
                }
            }
        });
        // Gradients outside the flat buffers (not yet gathered, or replaced since) one by one.
        for g in &self.groups {
            for (k, &i) in g.members.iter().enumerate() {
                let mut p = self.params[i].1.shallow_clone();
                if !g.is_bound(&p.grad(), &self.params, k) {
                    p.zero_grad();
                }
            }
        }
    }

    /// Multiplies every gradient by `factor` (undoing a loss scale).
    pub fn scale_grads(&mut self, factor: f64) {
        self.pending = None;
        tch::no_grad(|| {
            for (_, p) in &self.params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(factor);
                }
            }
        });
    }

    /// Makes every gradient a zero view of its group's flat buffer before the first backward
    /// pass, so the first step accumulates in place too (otherwise autograd allocates one
    /// gradient per parameter that the first `gather` copies over: a model-sized transient).
    /// Only for runs where every parameter gets a gradient at every step: a parameter that got
    /// none would then be stepped with a zero gradient (decayed) instead of skipped, as torch
    /// skips a parameter whose `.grad` is `None`.
    pub fn bind_gradients(&mut self) {
        // tch cannot assign `.grad`: the backward pass of a zero-weighted sum creates each one
        // (zeros), and `gather` then moves it into the flat buffer.
        let seed = self
            .params
            .iter()
            .fold(None::<Tensor>, |acc, (_, p)| {
                let term = p.view([-1]).narrow(0, 0, 1).sum(Kind::Float) * 0.0;
                Some(match acc {
                    Some(a) => a + term,
                    None => term,
                })
            });
        if let Some(seed) = seed {
            seed.backward();
            let _ = self.gather();
        }
    }

    /// Each group's gradients as one flat buffer, or `None` for a group where some parameter
    /// has no gradient (it is then stepped tensor by tensor, skipping those, as torch does).
    ///
    /// A gradient that is not yet a view of its group's flat buffer is copied there and made
    /// one (`set_data`), so from the next backward on autograd accumulates into the buffer.
    fn gather(&mut self) -> Vec<Option<Tensor>> {
        let params = &self.params;
        tch::no_grad(|| {
            self.groups
                .iter_mut()
                .map(|g| {
                    let grads: Vec<Tensor> = g.members.iter().map(|&i| params[i].1.grad()).collect();
                    if !grads.iter().all(Tensor::defined) {
                        return None;
                    }
                    if g.grad.is_none() {
                        g.grad = Some(g.flat.zeros_like());
                    }
                    let buf = g.grad.as_ref().map(Tensor::shallow_clone).unwrap();
                    for (k, mut grad) in grads.into_iter().enumerate() {
                        if !g.is_bound(&grad, params, k) {
                            let view = g.view(&buf, params, k);
                            view.shallow_clone().copy_(&grad);
                            if grad.kind() == Kind::Float {
                                grad.set_data(&view);
                            }
                        }
                    }
                    Some(buf)
                })
                .collect()
        })
    }

    /// Global L2 norm of all gradients; scales them down to `max_norm` when above it, as
    /// `clip_grad_norm_` does (the clipped gradients are the ones `step` applies). Returns the
    /// norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let gathered = self.gather();
        if gathered.iter().any(Option::is_none) {
            return self.clip_per_tensor(max_norm);
        }
        let flats: Vec<Tensor> = gathered.into_iter().flatten().collect();
        if flats.is_empty() {
            return 0.0;
        }
        let total = Tensor::stack(&flats.iter().map(accurate_norm).collect::<Vec<_>>(), 0).norm();
        if max_norm > 0.0 {
            // On the device: no host round trip decides whether to clip.
            // max_norm / (norm + 1e-6), capped at 1, as clip_grad_norm_ computes it.
            let coef = (total.ones_like() * max_norm / (&total + 1e-6)).clamp_max(1.0).to_kind(Kind::Float);
            tch::no_grad(|| {
                for g in &flats {
                    let _ = g.shallow_clone().g_mul_(&coef);
                }
            });
        }
        let norm = total.double_value(&[]);
        self.pending = Some(flats);
        norm
    }

    /// Clipping when some parameter has no gradient: per tensor, as before flat buffers.
    fn clip_per_tensor(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| accurate_norm(&g.to_kind(Kind::Float).reshape([-1]))).collect();
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

    /// `p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)` as torch.optim.AdamW computes it
    /// (decoupled decay applied first), on whole groups at once.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        let flats: Vec<Option<Tensor>> = match self.pending.take() {
            Some(f) => f.into_iter().map(Some).collect(),
            None => self.gather(),
        };
        let scalars = StepScalars::new(self.beta1, self.beta2, self.eps, self.weight_decay, lr, bc1, bc2);
        let longest = self.groups.iter().map(|g| g.flat.numel() as i64).max().unwrap_or(0);
        let Some(device) = self.groups.first().map(|g| g.flat.device()) else { return };
        let slice = update_slice(device).min(longest.max(1));
        // The operators' one temporary, a slice long, made the first time they run.
        let scratch = std::cell::RefCell::new(self.scratch.take().filter(|t| t.numel() as i64 >= slice && t.device() == device));
        // One pass on the CPU; elsewhere the operators, slice by slice of the flat buffers (or
        // of one parameter's views).
        let update = |p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, decay: bool| {
            let (mut p, mut m, mut v, g) = (p.view([-1]), m.view([-1]), v.view([-1]), g.view([-1]));
            if fused_update(&mut p, &mut m, &mut v, &g, decay, &scalars) {
                return;
            }
            let mut scratch = scratch.borrow_mut();
            let scratch = scratch.get_or_insert_with(|| Tensor::empty([slice], (Kind::Float, device)));
            let n = p.numel() as i64;
            for start in (0..n).step_by(slice as usize) {
                let len = slice.min(n - start);
                update_with_ops(&mut p.narrow(0, start, len), &mut m.narrow(0, start, len), &mut v.narrow(0, start, len),
                                &g.narrow(0, start, len), &mut scratch.narrow(0, 0, len), decay, &scalars);
            }
        };
        tch::no_grad(|| {
            for (group, flat) in self.groups.iter().zip(flats) {
                match flat {
                    Some(g) => update(&group.flat, &group.exp_avg, &group.exp_avg_sq, &g, group.decay),
                    None => {
                        for k in 0..group.members.len() {
                            let g = self.params[group.members[k]].1.grad();
                            if !g.defined() {
                                continue;
                            }
                            let p = group.view(&group.flat, &self.params, k);
                            let m = group.view(&group.exp_avg, &self.params, k);
                            let v = group.view(&group.exp_avg_sq, &self.params, k);
                            update(&p, &m, &v, &g.to_kind(Kind::Float).contiguous(), group.decay);
                        }
                    }
                }
            }
        });
        self.scratch = scratch.into_inner();
    }

    /// The moments of parameter `i` as views: (exp_avg, exp_avg_sq).
    fn moments(&self, i: usize) -> (Tensor, Tensor) {
        for g in &self.groups {
            if let Some(k) = g.members.iter().position(|&m| m == i) {
                return (g.view(&g.exp_avg, &self.params, k), g.view(&g.exp_avg_sq, &self.params, k));
            }
        }
        unreachable!("every parameter is in a group")
    }

    /// Named state tensors for a checkpoint: `exp_avg.<name>`, `exp_avg_sq.<name>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        for (i, (n, _)) in self.params.iter().enumerate() {
            let (m, v) = self.moments(i);
            out.push((format!("exp_avg.{n}"), m));
            out.push((format!("exp_avg_sq.{n}"), v));
        }
        out
    }

    pub fn load_state(&mut self, tensors: &std::collections::HashMap<String, Tensor>, step: i64) -> anyhow::Result<()> {
        tch::no_grad(|| -> anyhow::Result<()> {
            for (i, (n, _)) in self.params.iter().enumerate() {
                let (m, v) = self.moments(i);
                for (prefix, mut dst) in [("exp_avg", m), ("exp_avg_sq", v)] {
                    let key = format!("{prefix}.{n}");
                    let src = tensors.get(&key).ok_or_else(|| anyhow::anyhow!("training state lacks `{key}`"))?;
                    anyhow::ensure!(src.size() == dst.size(), "training state: `{key}` is {:?}, the parameter {:?}", src.size(), dst.size());
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

    #[test]
    fn gradient_norm_is_accurate_for_long_buffers() {
        // 17M elements, a model's worth: ATen's single fp32 reduction drifts by about 1e-3
        // here; the row-wise norm stays within 1e-5 of the fp64 norm, tail included. (No
        // random draws: the other tests of this module seed the global generator.)
        let n = (1 << 24) + 12345;
        let g = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.7).sin() * 0.01 + 0.003;
        let exact = g.to_kind(Kind::Double).norm().double_value(&[]);
        let ours = accurate_norm(&g).double_value(&[]);
        assert!(((ours - exact) / exact).abs() < 1e-5, "row-wise {ours} against fp64 {exact}");
        let short = g.narrow(0, 0, 1000);
        let exact_short = short.to_kind(Kind::Double).norm().double_value(&[]);
        assert!(((accurate_norm(&short).double_value(&[]) - exact_short) / exact_short).abs() < 1e-6);
    }

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
        // Gradients (3, 0) and (4): norm 5, clipped to 1 -> (0.6, 0) and (0.8). With lr 1,
        // no decay and a first step, AdamW moves each weight by about -sign(g) (m/sqrt(v) =
        // g/|g|), so the clipped step is checked through the moments instead.
        let a = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::zeros([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let loss = (&a * Tensor::from_slice(&[3.0f32, 0.0])).sum(Kind::Float) + (&b * Tensor::from_slice(&[4.0f32])).sum(Kind::Float);
        loss.backward();
        let mut opt = AdamW::new(vec![("a".into(), a.shallow_clone()), ("b".into(), b.shallow_clone())], 0.0);
        let norm = opt.clip_grad_norm(1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        opt.step(1e-3);
        let m: std::collections::HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        let ma = Vec::<f64>::try_from(m["exp_avg.a"].to_kind(Kind::Double)).unwrap();
        let mb = Vec::<f64>::try_from(m["exp_avg.b"].to_kind(Kind::Double)).unwrap();
        // exp_avg = (1 - beta1) * clipped gradient.
        assert!((ma[0] - 0.06).abs() < 1e-6 && ma[1] == 0.0 && (mb[0] - 0.08).abs() < 1e-6, "{ma:?} {mb:?}");
    }

    #[test]
    fn gradients_become_views_of_the_flat_buffer_and_autograd_accumulates_into_them() {
        let w = Tensor::ones([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut opt = AdamW::new(vec![("w".into(), w.shallow_clone()), ("b".into(), b.shallow_clone())], 0.0);
        let backward = |k: f64| ((&w * k).sum(Kind::Float) + (&b * k).sum(Kind::Float)).backward();
        backward(1.0);
        opt.step(0.1); // gathers: the gradients are bound to the flat buffers here
        opt.zero_grad();
        assert_eq!(w.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
        backward(2.0);
        backward(3.0);
        let flats = opt.gather();
        for (p, flat) in [(&w, &flats[0]), (&b, &flats[1])] {
            let flat = flat.as_ref().expect("every gradient defined");
            assert_eq!(p.grad().data_ptr(), flat.data_ptr(), "each group's first gradient starts its flat buffer");
            assert!(flat.eq(5.0).all().int64_value(&[]) == 1, "both backward passes accumulated into the buffer");
        }
        // Clipping scales the gradients themselves, as clip_grad_norm_ does.
        let norm = opt.clip_grad_norm(1.0);
        assert!((norm - 15.0).abs() < 1e-4, "{norm}");
        assert!((w.grad().double_value(&[0, 0]) - 5.0 / 15.0).abs() < 1e-6);
    }

    #[test]
    fn flat_and_per_tensor_steps_agree_bit_for_bit() {
        // The flat path (every gradient present) and the per-tensor fallback (one missing)
        // compute the same elementwise arithmetic.
        let make = |seed: i64| {
            tch::manual_seed(seed);
            vec![
                ("w".to_string(), Tensor::randn([3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true)),
                ("b".to_string(), Tensor::randn([4], (Kind::Float, Device::Cpu)).set_requires_grad(true)),
                ("u".to_string(), Tensor::randn([2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true)),
            ]
        };
        let (p1, p2) = (make(3), make(3));
        let mut o1 = AdamW::new(p1.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), 0.1);
        let mut o2 = AdamW::new(p2.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), 0.1);
        tch::manual_seed(9);
        let gw = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let gb = Tensor::randn([4], (Kind::Float, Device::Cpu));
        for step in 0..3 {
            (&p1[0].1 * &gw).sum(Kind::Float).backward();
            (&p1[1].1 * &gb).sum(Kind::Float).backward();
            (&p2[0].1 * &gw).sum(Kind::Float).backward();
            (&p2[1].1 * &gb).sum(Kind::Float).backward();
            // p1's `u` gets a zero gradient (flat path); p2's `u` none (per-tensor path, `u` skipped).
            (&p1[2].1 * 0.0).sum(Kind::Float).backward();
            o1.clip_grad_norm(1e6);
            o2.clip_grad_norm(1e6);
            o1.step(0.01 * (step + 1) as f64);
            o2.step(0.01 * (step + 1) as f64);
            o1.zero_grad();
            o2.zero_grad();
        }
        for k in 0..2 {
            assert!(p1[k].1.equal(&p2[k].1), "{} differs", p1[k].0);
        }
        // `u` was decayed and moved by zero gradients in o1 only (torch skips only missing ones).
        assert!(!p1[2].1.equal(&p2[2].1));
    }

    #[test]
    fn the_fused_cpu_update_equals_the_operators_bit_for_bit() {
        // Values across many magnitudes (tiny and large gradients, zero moments, negative
        // parameters), a length that is no multiple of a task or a vector, decay on and off,
        // and steps late enough for the bias corrections to matter less.
        let n = 3 * FUSED_TASK as i64 + 1237;
        let draw = |seed: i64, scale: f64| {
            tch::manual_seed(seed);
            Tensor::randn([n], (Kind::Float, Device::Cpu)) * Tensor::randn([n], (Kind::Float, Device::Cpu)).exp() * scale
        };
        for (decay, wd, t) in [(true, 0.1, 1), (false, 0.1, 2), (true, 0.0, 7), (true, 0.01, 1000)] {
            let (bc1, bc2) = (1.0 - 0.9f64.powi(t), 1.0 - 0.999f64.powi(t));
            let s = StepScalars::new(0.9, 0.999, 1e-8, wd, 3e-4, bc1, bc2);
            let (p, g) = (draw(1, 1.0), draw(2, 1e-3));
            let m = draw(3, 1e-4);
            let v = draw(4, 1e-7).abs();
            let _ = v.narrow(0, 0, 100).zero_();
            let (mut p1, mut m1, mut v1) = (p.copy(), m.copy(), v.copy());
            let (mut p2, mut m2, mut v2) = (p.copy(), m.copy(), v.copy());
            assert!(fused_update(&mut p1, &mut m1, &mut v1, &g, decay, &s), "contiguous fp32 CPU tensors take the fused path");
            let mut d = Tensor::empty([n], (Kind::Float, Device::Cpu));
            update_with_ops(&mut p2, &mut m2, &mut v2, &g, &mut d, decay, &s);
            for (name, a, b) in [("parameters", &p1, &p2), ("first moments", &m1, &m2), ("second moments", &v1, &v2)] {
                let differing = a.view_dtype(Kind::Int).ne_tensor(&b.view_dtype(Kind::Int)).sum(Kind::Int64).int64_value(&[]);
                assert_eq!(differing, 0, "{name} differ in {differing} of {n} elements (decay {decay}, wd {wd}, step {t})");
            }
            assert!(!p1.equal(&p), "the step moved the parameters");
        }
        // Anything else is left to the operators.
        let (mut a, mut b, mut c) = (draw(1, 1.0).narrow(0, 0, 10), draw(1, 1.0).narrow(0, 0, 10), draw(1, 1.0).narrow(0, 0, 10));
        let s = StepScalars::new(0.9, 0.999, 1e-8, 0.0, 1e-3, 0.1, 0.001);
        assert!(!fused_update(&mut a, &mut b, &mut c, &draw(2, 1.0).narrow(0, 0, 20).view([10, 2]).select(1, 0), false, &s));
        assert!(!fused_update(&mut a, &mut b, &mut c, &Tensor::ones([10], (Kind::Double, Device::Cpu)), false, &s));
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
