//! The elementwise half of the fused forward-KL loss on the CPU: from one chunk's student and
//! teacher logits to the logit gradient and the CE and KD sums, in one sweep per row.
//!
//! Written as libtorch ops the same arithmetic is about a dozen passes over `[rows, vocab]`
//! fp32 tensors (two casts, two log-softmaxes, three exponentials, subtractions, scalings, a
//! dot product, a cast back), each reading and writing main memory: 440 ms a step at SmolLM2's
//! vocabulary on 2 cores, a sixth of the bf16 step. Here a row (two 49152-entry bf16 rows are
//! 192 KiB, within a core's L2) is read three times from cache and its gradient written once.
//!
//! Per row, with `z` the student's logits, `y` the teacher's, `T` the temperature, `a` the CE
//! weight and `c` the KD weight times `T` (both over the normaliser):
//! `g = a (softmax(z) - onehot(target)) + c (softmax(z/T) - softmax(y/T))`,
//! `CE = logsumexp(z) - z[target]`, `KD = T^2 sum p_t (log p_t - log softmax(z/T))`, the
//! formulas of `losses::chunked_forward_kl`'s libtorch path, which the tests compare against.
use anyhow::{ensure, Context, Result};
use crate::base::elem::{elements, exp, Bf16, Element, Output};
use crate::base::omp::parallel_tasks;
use multiversion::multiversion;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// Lanes of the blocked loops: independent accumulators that the compiler keeps in vector
/// registers (a single running sum would have to be added in order, one element at a time).
const LANES: usize = 16;

/// The weights of one chunk's gradient (see the module's formulas).
#[derive(Clone, Copy, Debug)]
pub struct LogitGradWeights {
    /// `alpha / normalizer`.
    pub ce: f32,
    /// `beta * T / normalizer`.
    pub kd: f32,
    pub temperature: f32,
}

/// Rows' CE and KD sums (KD already scaled by `T^2`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowSums {
    pub ce: f64,
    pub kd: f64,
}

impl std::ops::Add for RowSums {
    type Output = RowSums;
    fn add(self, o: RowSums) -> RowSums {
        RowSums { ce: self.ce + o.ce, kd: self.kd + o.kd }
    }
}

/// The largest entry and `0 * sum` (NaN when any entry is NaN or infinite, else 0: what
/// keeps a non-finite logit visible in the loss, as the libtorch path's would be).
#[inline(always)]
fn max_and_poison<E: Element>(x: &[E]) -> (f32, f32) {
    let (mut m, mut poison) = ([f32::NEG_INFINITY; LANES], [0f32; LANES]);
    let blocks = x.chunks_exact(LANES);
    let rest = blocks.remainder();
    for b in blocks {
        for i in 0..LANES {
            let v = b[i].f32();
            m[i] = m[i].max(v);
            poison[i] += v * 0.0;
        }
    }
    for (i, v) in rest.iter().enumerate() {
        m[i] = m[i].max(v.f32());
        poison[i] += v.f32() * 0.0;
    }
    (m.iter().copied().fold(f32::NEG_INFINITY, f32::max), poison.iter().sum())
}

/// `sum exp((x - shift) * scale)`.
#[inline(always)]
fn sum_exp<E: Element>(x: &[E], shift: f32, scale: f32) -> f64 {
    let mut s = [0f32; LANES];
    let blocks = x.chunks_exact(LANES);
    let rest = blocks.remainder();
    for b in blocks {
        for i in 0..LANES {
            s[i] += exp((b[i].f32() - shift) * scale);
        }
    }
    for (i, v) in rest.iter().enumerate() {
        s[i] += exp((v.f32() - shift) * scale);
    }
    s.iter().map(|&v| f64::from(v)).sum()
}

/// `log sum exp(x * scale)` of a row, with its poison term (see [`max_and_poison`]).
#[inline(always)]
fn log_sum_exp<E: Element>(x: &[E], scale: f32) -> (f32, f32) {
    let (max, poison) = max_and_poison(x);
    (max * scale + sum_exp(x, max, scale).ln() as f32, poison)
}

/// One row: writes `g`, returns its CE and KD. `TEMPERED`: `T != 1` (two student softmaxes).
#[inline(always)]
fn row<S: Element, T: Element, G: Output, const TEMPERED: bool>(z: &[S], y: Option<&[T]>, target: usize, w: LogitGradWeights, g: &mut [G]) -> RowSums {
    let inv_t = 1.0 / w.temperature;
    let (lse, poison) = log_sum_exp(z, 1.0);
    let ce = f64::from(lse - z[target].f32() + poison);
    let Some(y) = y else {
        for (gi, zi) in g.iter_mut().zip(z) {
            *gi = G::from_f32(w.ce * exp(zi.f32() - lse));
        }
        g[target] = G::from_f32(w.ce * exp(z[target].f32() - lse) - w.ce);
        return RowSums { ce, kd: 0.0 };
    };
    let lse_tempered = if TEMPERED { log_sum_exp(z, inv_t).0 } else { lse };
    let (lse_teacher, teacher_poison) = log_sum_exp(y, inv_t);
    // The gradient at one entry, and the entry's KD term.
    let at = |zs: f32, yt: f32| -> (f32, f32) {
        let ls = zs - lse;
        let ps = exp(ls);
        let (ls_t, ps_t) = if TEMPERED {
            let l = zs * inv_t - lse_tempered;
            (l, exp(l))
        } else {
            (ls, ps)
        };
        let lt = yt * inv_t - lse_teacher;
        let pt = exp(lt);
        (w.ce * ps + w.kd * (ps_t - pt), pt * (lt - ls_t))
    };
    let mut kd = [0f32; LANES];
    let n = z.len() - z.len() % LANES;
    for ((gb, zb), yb) in g[..n].chunks_exact_mut(LANES).zip(z[..n].chunks_exact(LANES)).zip(y[..n].chunks_exact(LANES)) {
        for i in 0..LANES {
            let (gv, kv) = at(zb[i].f32(), yb[i].f32());
            gb[i] = G::from_f32(gv);
            kd[i] += kv;
        }
    }
    for (i, ((gi, zi), yi)) in g[n..].iter_mut().zip(&z[n..]).zip(&y[n..]).enumerate() {
        let (gv, kv) = at(zi.f32(), yi.f32());
        *gi = G::from_f32(gv);
        kd[i] += kv;
    }
    g[target] = G::from_f32(at(z[target].f32(), y[target].f32()).0 - w.ce);
    let t2 = f64::from(w.temperature) * f64::from(w.temperature);
    RowSums { ce, kd: (kd.iter().map(|&v| f64::from(v)).sum::<f64>() + f64::from(teacher_poison)) * t2 }
}

/// Rows `z` (and `y`) of width `vocab` into `g`, compiled for the widest vector instructions
/// the CPU has (AVX-512, else AVX2; 16-lane blocks either way, so the sums are the same).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx2+fma", "x86_64+avx2+fma"))]
fn rows<S: Element, T: Element, G: Output>(z: &[S], y: Option<&[T]>, targets: &[i64], vocab: usize, w: LogitGradWeights, g: &mut [G]) -> RowSums {
    let mut sums = RowSums::default();
    for (r, gr) in g.chunks_exact_mut(vocab).enumerate() {
        let zr = &z[r * vocab..(r + 1) * vocab];
        let yr = y.map(|y| &y[r * vocab..(r + 1) * vocab]);
        let target = targets[r] as usize;
        sums = sums
            + if w.temperature == 1.0 {
                row::<S, T, G, false>(zr, yr, target, w, gr)
            } else {
                row::<S, T, G, true>(zr, yr, target, w, gr)
            };
    }
    sums
}

/// The logit gradient of one chunk into `g` `[rows, vocab]` (fp32 or bf16), from the
/// student's logits `z` and the teacher's `y` (each fp32 or bf16, `[rows, vocab]`, contiguous;
/// no teacher: CE alone) and the next tokens `targets`; returns the chunk's CE and KD sums.
/// `g` may be `z` itself (the same tensor): the gradient then overwrites the logits, each row
/// copied to a cache-sized scratch row before its gradient is written, so a chunk needs one
/// `[rows, vocab]` buffer fewer. Rows run in parallel on libtorch's threads.
pub fn forward_kl_logit_grad(z: &Tensor, y: Option<&Tensor>, targets: &[i64], w: LogitGradWeights, g: &Tensor) -> Result<RowSums> {
    let (rows, vocab) = z.size2()?;
    ensure!(targets.len() as i64 == rows, "logit_grad: {} targets for {rows} rows", targets.len());
    ensure!(targets.iter().all(|&t| (0..vocab).contains(&t)), "logit_grad: a target outside the vocabulary of {vocab}");
    ensure!(g.size() == [rows, vocab], "logit_grad: gradient buffer {:?} for logits [{rows}, {vocab}]", g.size());
    ensure!(g.is_contiguous() && g.device() == Device::Cpu, "logit_grad: the gradient buffer must be contiguous on the CPU");
    let (n, v) = (rows as usize * vocab as usize, vocab as usize);
    if n == 0 {
        return Ok(RowSums::default());
    }
    let in_place = g.data_ptr() == z.data_ptr();
    ensure!(!in_place || g.kind() == z.kind(), "logit_grad: a gradient written over the logits must have their dtype");
    ensure!(in_place || !overlaps(z, g), "logit_grad: the gradient buffer overlaps the logits without being them");
    ensure!(y.is_none_or(|y| !overlaps(y, g)), "logit_grad: the gradient buffer overlaps the teacher's logits");
    // SAFETY (both): `g` is a contiguous CPU tensor of `n` elements (checked above) of the kind
    // matched below, written only through this one slice; in place, `z` is read only through
    // it too (below), else `g` shares no memory with `z` or `y` (checked above).
    let g_f32 = || unsafe { std::slice::from_raw_parts_mut(g.data_ptr() as *mut f32, n) };
    let g_bf16 = || unsafe { std::slice::from_raw_parts_mut(g.data_ptr() as *mut Bf16, n) };
    macro_rules! teacher_rows {
        ($t:ty, $f:expr) => {
            match y {
                None => $f(None::<&[f32]>),
                Some(y) => {
                    let ys = elements::<$t>(y, n).context("logit_grad: teacher logits")?;
                    $f(Some(ys))
                }
            }
        };
    }
    macro_rules! with_teacher {
        ($f:expr) => {
            match y.map(Tensor::kind) {
                None | Some(Kind::Float) => teacher_rows!(f32, $f),
                Some(Kind::BFloat16) => teacher_rows!(Bf16, $f),
                Some(t) => anyhow::bail!("logit_grad: teacher logits must be fp32 or bf16, got {t:?}"),
            }
        };
    }
    if in_place {
        return Ok(match z.kind() {
            Kind::Float => with_teacher!(|ys| par_rows_in_place(g_f32(), ys, targets, v, w)),
            Kind::BFloat16 => with_teacher!(|ys| par_rows_in_place(g_bf16(), ys, targets, v, w)),
            k => anyhow::bail!("logit_grad: student logits must be fp32 or bf16, got {k:?}"),
        });
    }
    macro_rules! into_gradient {
        ($s:ty) => {{
            let zs = elements::<$s>(z, n).context("logit_grad: student logits")?;
            match g.kind() {
                Kind::Float => with_teacher!(|ys| par_rows(zs, ys, targets, v, w, g_f32())),
                Kind::BFloat16 => with_teacher!(|ys| par_rows(zs, ys, targets, v, w, g_bf16())),
                k => anyhow::bail!("logit_grad: the gradient buffer must be fp32 or bf16, got {k:?}"),
            }
        }};
    }
    Ok(match z.kind() {
        Kind::Float => into_gradient!(f32),
        Kind::BFloat16 => into_gradient!(Bf16),
        k => anyhow::bail!("logit_grad: student logits must be fp32 or bf16, got {k:?}"),
    })
}

/// Whether two CPU tensors' memory ranges intersect.
fn overlaps(a: &Tensor, b: &Tensor) -> bool {
    let range = |t: &Tensor| {
        let start = t.data_ptr() as usize;
        (start, start + t.numel() * t.kind().elt_size_in_bytes())
    };
    let ((a0, a1), (b0, b1)) = (range(a), range(b));
    a0 < b1 && b0 < a1
}

/// Splits the rows of `g` over libtorch's OpenMP threads, a few rows a task (on rayon's
/// threads the sweep competed with libtorch's, spinning after the matrix product just
/// before), `work(first row, the task's rows of g)` each, and adds the tasks' sums in row
/// order, so they do not depend on which thread ran what.
fn par_tasks<G: Send>(g: &mut [G], vocab: usize, work: &(dyn Fn(usize, &mut [G]) -> RowSums + Sync)) -> RowSums {
    const ROWS_PER_TASK: usize = 2;
    let tasks: Vec<Mutex<(&mut [G], RowSums)>> = g.chunks_mut(ROWS_PER_TASK * vocab).map(|gt| Mutex::new((gt, RowSums::default()))).collect();
    parallel_tasks(tasks.len(), &|task| {
        let mut slot = tasks[task].lock().unwrap_or_else(|e| e.into_inner());
        let (gt, sums) = &mut *slot;
        *sums = work(task * ROWS_PER_TASK, gt);
    });
    tasks.into_iter().map(|t| t.into_inner().unwrap_or_else(|e| e.into_inner()).1).fold(RowSums::default(), |a, b| a + b)
}

/// [`rows`] over the threads, `z` (and `y`) into `g`.
fn par_rows<S: Element, T: Element, G: Output>(z: &[S], y: Option<&[T]>, targets: &[i64], vocab: usize, w: LogitGradWeights, g: &mut [G]) -> RowSums {
    par_tasks(g, vocab, &|first, gt| {
        let span = first * vocab..first * vocab + gt.len();
        rows(&z[span.clone()], y.map(|y| &y[span]), &targets[first..first + gt.len() / vocab], vocab, w, gt)
    })
}

/// [`rows`] over the threads, the gradient written over the logits `zg`: each row is copied
/// to a scratch row first (it stays in the core's cache: 192 KiB at a 49152 vocabulary), which
/// the sweep reads while it writes the gradient over the original.
fn par_rows_in_place<E: Element + Output, T: Element>(zg: &mut [E], y: Option<&[T]>, targets: &[i64], vocab: usize, w: LogitGradWeights) -> RowSums {
    par_tasks(zg, vocab, &|first, gt| {
        let mut scratch = Vec::with_capacity(vocab);
        let mut sums = RowSums::default();
        for (r, row_zg) in gt.chunks_exact_mut(vocab).enumerate() {
            let at = first + r;
            scratch.clear();
            scratch.extend_from_slice(row_zg);
            sums = sums + rows(&scratch, y.map(|y| &y[at * vocab..(at + 1) * vocab]), &targets[at..at + 1], vocab, w, row_zg);
        }
        sums
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_library_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (f64::from(exp(x)), f64::from(x).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "largest relative error {worst}");
        assert_eq!(exp(-90.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }

    /// The module's formulas in f64 libtorch ops: (gradient, the sum of its terms' magnitudes
    /// (the scale of its rounding error where they cancel), CE sum, KD sum).
    fn reference(z: &Tensor, y: Option<&Tensor>, targets: &Tensor, w: LogitGradWeights) -> (Tensor, Tensor, f64, f64) {
        let t = f64::from(w.temperature);
        let z = z.to_kind(Kind::Double);
        let ls = z.log_softmax(-1, Kind::Double);
        let tgt = targets.unsqueeze(1);
        let ce = -ls.gather(1, &tgt, false).sum(Kind::Double).double_value(&[]);
        let onehot = ls.zeros_like().scatter_value(1, &tgt, 1.0);
        let mut g = (ls.exp() - &onehot) * f64::from(w.ce);
        let mut magnitude = (ls.exp() + onehot) * f64::from(w.ce);
        let mut kd = 0.0;
        if let Some(y) = y {
            let ls_t = (&z / t).log_softmax(-1, Kind::Double);
            let lt = (y.to_kind(Kind::Double) / t).log_softmax(-1, Kind::Double);
            let pt = lt.exp();
            kd = (&pt * (&lt - &ls_t)).sum(Kind::Double).double_value(&[]) * t * t;
            g = g + (ls_t.exp() - &pt) * f64::from(w.kd);
            magnitude = magnitude + (ls_t.exp() + pt) * f64::from(w.kd);
        }
        (g, magnitude, ce, kd)
    }

    /// Against the f64 reference at a vocabulary where fp16 would underflow and that is not a
    /// multiple of the lanes: fp32 and bf16 logits, fp32 and bf16 gradients, with and without
    /// a teacher, at temperature 1 and 2.
    #[test]
    fn the_sweep_equals_the_formulas() {
        let (rows, vocab) = (7, 32_771);
        tch::manual_seed(3);
        let z = Tensor::randn([rows, vocab], (Kind::Float, Device::Cpu)) * 4.0;
        let y = Tensor::randn([rows, vocab], (Kind::Float, Device::Cpu)) * 3.0 + z.shallow_clone() * 0.5;
        let targets = Tensor::randint(vocab, [rows], (Kind::Int64, Device::Cpu));
        let host_targets = Vec::<i64>::try_from(&targets).unwrap();
        for logits in [Kind::Float, Kind::BFloat16] {
            for out in [Kind::Float, Kind::BFloat16] {
                for (temperature, teacher) in [(1.0, true), (2.0, true), (1.0, false)] {
                    let w = LogitGradWeights { ce: 0.3, kd: 0.7 * temperature, temperature };
                    let (z, y) = (z.to_kind(logits), y.to_kind(logits));
                    let y = teacher.then_some(&y);
                    let g = Tensor::empty([rows, vocab], (out, Device::Cpu));
                    let sums = forward_kl_logit_grad(&z, y, &host_targets, w, &g).unwrap();
                    let (want_g, magnitude, want_ce, want_kd) = reference(&z, y, &targets, w);
                    let case = format!("logits {logits:?}, gradient {out:?}, T {temperature}, teacher {teacher}");
                    assert!((sums.ce - want_ce).abs() < 1e-5 * want_ce.abs(), "{case}: CE {} vs {want_ce}", sums.ce);
                    assert!((sums.kd - want_kd).abs() < 1e-5 * want_kd.abs().max(1.0), "{case}: KD {} vs {want_kd}", sums.kd);
                    // Per entry: fp32 to 1e-5 of its terms (the log-sum-exp is fp32, as libtorch's is);
                    // bf16 to its rounding on top.
                    let err = (g.to_kind(Kind::Double) - &want_g).abs();
                    let mut bound = &magnitude * 1e-5 + 1e-30;
                    if out == Kind::BFloat16 {
                        bound = bound + want_g.abs() * (1.0 / 256.0);
                    }
                    let over = err.gt_tensor(&bound).sum(Kind::Int64).int64_value(&[]);
                    assert_eq!(over, 0, "{case}: {over} gradient entries off the formula");
                }
            }
        }
    }

    /// Written over the logits, the gradient and the sums are bit-identical to the separate
    /// buffer's, for both dtypes, with and without a teacher, at either temperature, over rows
    /// spread on the threads (an odd count: a task of one row).
    #[test]
    fn the_sweep_over_the_logits_equals_the_sweep_into_a_buffer() {
        let (rows, vocab) = (9, 4_099);
        tch::manual_seed(5);
        let z = Tensor::randn([rows, vocab], (Kind::Float, Device::Cpu)) * 4.0;
        let y = Tensor::randn([rows, vocab], (Kind::Float, Device::Cpu)) * 3.0;
        let targets: Vec<i64> = (0..rows).map(|r| (r * 397) % vocab).collect();
        for kind in [Kind::Float, Kind::BFloat16] {
            for (temperature, teacher) in [(1.0, true), (2.0, true), (1.0, false)] {
                let w = LogitGradWeights { ce: 0.4, kd: 0.6 * temperature, temperature };
                let (z, y) = (z.to_kind(kind), y.to_kind(kind));
                let y = teacher.then_some(&y);
                let separate = Tensor::empty([rows, vocab], (kind, Device::Cpu));
                let want = forward_kl_logit_grad(&z, y, &targets, w, &separate).unwrap();
                let over = z.copy();
                let got = forward_kl_logit_grad(&over, y, &targets, w, &over).unwrap();
                let case = format!("{kind:?}, T {temperature}, teacher {teacher}");
                assert_eq!((got.ce.to_bits(), got.kd.to_bits()), (want.ce.to_bits(), want.kd.to_bits()), "{case}: sums");
                assert!(over.equal(&separate), "{case}: the gradient written over the logits differs");
            }
        }
    }

    #[test]
    fn a_non_finite_logit_makes_the_loss_nan() {
        let z = Tensor::zeros([2, 40], (Kind::Float, Device::Cpu));
        let y = Tensor::zeros([2, 40], (Kind::Float, Device::Cpu));
        let _ = z.get(1).get(5).fill_(f64::NAN);
        let _ = y.get(0).get(39).fill_(f64::INFINITY);
        let g = Tensor::empty([2, 40], (Kind::Float, Device::Cpu));
        let w = LogitGradWeights { ce: 1.0, kd: 1.0, temperature: 1.0 };
        let sums = forward_kl_logit_grad(&z, Some(&y), &[0, 1], w, &g).unwrap();
        assert!(sums.ce.is_nan(), "a NaN student logit");
        assert!(sums.kd.is_nan(), "an infinite teacher logit");
    }

    #[test]
    fn bad_inputs_are_refused() {
        let z = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
        let g = Tensor::empty([2, 8], (Kind::Float, Device::Cpu));
        let w = LogitGradWeights { ce: 1.0, kd: 1.0, temperature: 1.0 };
        assert!(forward_kl_logit_grad(&z, None, &[0, 8], w, &g).is_err(), "a target outside the vocabulary");
        assert!(forward_kl_logit_grad(&z, None, &[0], w, &g).is_err(), "one target for two rows");
        let half = z.to_kind(Kind::Half);
        assert!(forward_kl_logit_grad(&half, None, &[0, 1], w, &g).is_err(), "f16 logits");
        assert!(forward_kl_logit_grad(&z, None, &[0, 1], w, &g.tr()).is_err(), "a transposed buffer");
        let wide = Tensor::zeros([3, 8], (Kind::Float, Device::Cpu));
        let (rows_0_1, rows_1_2) = (wide.narrow(0, 0, 2), wide.narrow(0, 1, 2));
        assert!(forward_kl_logit_grad(&rows_0_1, None, &[0, 1], w, &rows_1_2).is_err(), "a buffer overlapping the logits");
        assert!(forward_kl_logit_grad(&z, Some(&rows_0_1), &[0, 1], w, &rows_1_2).is_err(), "a buffer overlapping the teacher's logits");
        assert!(forward_kl_logit_grad(&rows_1_2, Some(&rows_0_1), &[0, 1], w, &rows_1_2).is_err(), "written over the logits, which overlap the teacher's");
    }
}
