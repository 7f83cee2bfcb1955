//! CPU kernels for the elementwise work of a decoding step, where each layer sees a few rows
//! (one token per sequence). There libtorch spends more time dispatching small operators than
//! computing them: RMSNorm is eight operators and rotary embedding six per tensor, about 50
//! microseconds for an RMSNorm of 16 rows of 576 against a few for one pass over the data.
//! Each kernel does one pass and rounds where the libtorch expression it replaces rounds
//! (every libtorch operator on bf16 computes in fp32 and rounds its result to bf16): rotary
//! embedding is bit-identical; RMSNorm sums its squares in another order, so a rare bf16
//! element rounds the other way.
//!
//! They run only inside a decoding step ([`DecodingStep`]: a forward pass with a KV cache) on
//! CPU tensors in fp32 or bf16 of at most [`MAX_ROWS`] rows with nothing for autograd to
//! record. Everything else (training, checkpointed recomputation, evaluation, prompts) keeps
//! libtorch's operators, so its results do not depend on a batch's size. Where a kernel does
//! not apply it returns `None`, and the caller runs the libtorch expression.
use crate::base::device::autograd_records;
use crate::base::elem::{elements, rounded, Bf16, Element, Output};
use std::cell::Cell;
use tch::{Device, Kind, Tensor};

/// The most rows (positions across the batch) a kernel takes: a decoding step's batch.
pub const MAX_ROWS: i64 = 32;

thread_local! {
    static IN_DECODING_STEP: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside a decoding step's forward pass until dropped (libtorch's grad
/// mode is thread-local too, and the forward pass runs on the thread that calls it).
pub struct DecodingStep {
    was: bool,
}

impl DecodingStep {
    pub fn enter() -> DecodingStep {
        DecodingStep { was: IN_DECODING_STEP.with(|c| c.replace(true)) }
    }
}

impl Drop for DecodingStep {
    fn drop(&mut self) {
        IN_DECODING_STEP.with(|c| c.set(self.was));
    }
}

/// Whether this thread is inside a [`DecodingStep`].
pub fn in_decoding_step() -> bool {
    IN_DECODING_STEP.with(Cell::get)
}

/// Whether the kernels take these tensors: inside a decoding step, all on the CPU, of one kind
/// (fp32 or bf16), contiguous and not empty, with nothing for autograd to record.
fn applies(tensors: &[&Tensor]) -> bool {
    let kind = tensors[0].kind();
    in_decoding_step()
        && matches!(kind, Kind::Float | Kind::BFloat16)
        && tensors.iter().all(|t| t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous() && t.numel() > 0)
        && !autograd_records(tensors)
}

/// The rows of `x` when its last dimension is `dim` (not 0) and it has at most [`MAX_ROWS`]
/// of them.
fn small_rows(x: &Tensor, dim: i64) -> Option<i64> {
    let size = x.size();
    let rows: i64 = size[..size.len().saturating_sub(1)].iter().product();
    (dim > 0 && size.last() == Some(&dim) && rows <= MAX_ROWS).then_some(rows)
}

/// A tensor's elements, which [`applies`] has checked are readable as `E`.
fn elems<E: Element>(t: &Tensor) -> &[E] {
    elements(t, t.numel()).expect("checked by `applies`")
}

/// A fresh tensor like `like`, filled by `fill` through its elements.
fn new_like<E: Output>(like: &Tensor, fill: impl FnOnce(&mut [E])) -> Tensor {
    let out = Tensor::empty(like.size(), (like.kind(), Device::Cpu));
    // SAFETY: `out` was just allocated contiguous with `numel` elements of `like`'s kind, which
    // is `E`'s, and nothing else refers to it yet.
    fill(unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut E, out.numel()) });
    out
}

/// `rms_norm` of `causal_lm` (transformers' `LlamaRMSNorm`): `(x32 * rsqrt(mean(x32^2) + eps))`
/// rounded to the input's dtype, times `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Option<Tensor> {
    let dim = weight.size().first().copied()?;
    if weight.dim() != 1 || small_rows(x, dim).is_none() || !applies(&[x, weight]) {
        return None;
    }
    Some(match x.kind() {
        Kind::BFloat16 => rms_norm_rows::<Bf16>(x, weight, eps),
        _ => rms_norm_rows::<f32>(x, weight, eps),
    })
}

fn rms_norm_rows<E: Element + Output>(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let (xs, w) = (elems::<E>(x), elems::<E>(weight));
    new_like(x, |out: &mut [E]| {
        for (row, out) in xs.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
            // Eight partial sums, so the loop vectorizes (libtorch's reduction has its own order).
            let mut partial = [0f32; 8];
            let chunks = row.chunks_exact(8);
            let tail: f32 = chunks.remainder().iter().map(|v| v.f32() * v.f32()).sum();
            for chunk in chunks {
                for (p, v) in partial.iter_mut().zip(chunk) {
                    *p += v.f32() * v.f32();
                }
            }
            let var = (partial.iter().sum::<f32>() + tail) / w.len() as f32;
            let r = 1.0 / (var + eps as f32).sqrt();
            for ((o, v), g) in out.iter_mut().zip(row).zip(w) {
                *o = E::from_f32(rounded::<E>(v.f32() * r) * g.f32());
            }
        }
    })
}

/// Rotary embedding as `causal_lm` applies it, `x * cos + rotate_half(x) * sin`, where
/// `rotate_half` is `[-x2, x1]` of the two halves of each head: `x` `[b, heads, t, hd]`, `cos`
/// and `sin` `[b, t, hd]`.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Option<Tensor> {
    let (b, heads, t, hd) = x.size4().ok()?;
    if hd % 2 != 0 || b * t > MAX_ROWS || cos.size() != [b, t, hd] || sin.size() != [b, t, hd] || !applies(&[x, cos, sin]) {
        return None;
    }
    Some(match x.kind() {
        Kind::BFloat16 => rotary_heads::<Bf16>(x, cos, sin, [b, heads, t, hd]),
        _ => rotary_heads::<f32>(x, cos, sin, [b, heads, t, hd]),
    })
}

fn rotary_heads<E: Element + Output>(x: &Tensor, cos: &Tensor, sin: &Tensor, [_, heads, t, hd]: [i64; 4]) -> Tensor {
    let (xs, cs, ss) = (elems::<E>(x), elems::<E>(cos), elems::<E>(sin));
    let (heads, t, hd) = (heads as usize, t as usize, hd as usize);
    let half = hd / 2;
    let rotate = |x: f32, c: E, x_other: f32, s: E| E::from_f32(rounded::<E>(x * c.f32()) + rounded::<E>(x_other * s.f32()));
    new_like(x, |out: &mut [E]| {
        for (n, (row, out)) in xs.chunks_exact(hd).zip(out.chunks_exact_mut(hd)).enumerate() {
            // Row n is (batch, head, position); cos and sin are shared by the heads.
            let table = (n / (heads * t) * t + n % t) * hd;
            let (c, s) = (&cs[table..table + hd], &ss[table..table + hd]);
            let ((lo, hi), (out_lo, out_hi)) = (row.split_at(half), out.split_at_mut(half));
            let ((c_lo, c_hi), (s_lo, s_hi)) = (c.split_at(half), s.split_at(half));
            // Iterators, not indices: no bounds checks, so the loops vectorize.
            for ((((o, x), other), c), s) in out_lo.iter_mut().zip(lo).zip(hi).zip(c_lo).zip(s_lo) {
                *o = rotate(x.f32(), *c, -other.f32(), *s);
            }
            for ((((o, x), other), c), s) in out_hi.iter_mut().zip(hi).zip(lo).zip(c_hi).zip(s_hi) {
                *o = rotate(x.f32(), *c, other.f32(), *s);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::causal_lm::{rms_norm_ops, rotary_ops};

    fn random(shape: &[i64], kind: Kind, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        (Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 3.0).to_kind(kind)
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
    }

    /// Positions of `got` whose value differs from `want`'s, as a fraction.
    fn share_differing(got: &Tensor, want: &Tensor) -> f64 {
        got.ne_tensor(want).to_kind(Kind::Float).mean(Kind::Float).double_value(&[])
    }

    /// `f` as a decoding step's forward pass runs it: grad mode off, inside a [`DecodingStep`].
    fn in_step<T>(f: impl FnOnce() -> T) -> T {
        let _step = DecodingStep::enter();
        tch::no_grad(f)
    }

    #[test]
    fn rms_norm_matches_the_libtorch_expression() {
        in_step(|| {
            for kind in [Kind::Float, Kind::BFloat16] {
                let (x, w) = (random(&[16, 1, 576], kind, 1), random(&[576], kind, 2));
                let (got, want) = (rms_norm(&x, &w, 1e-5).expect("a decoding step's rows"), rms_norm_ops(&x, &w, 1e-5));
                assert_eq!((got.size(), got.kind()), (want.size(), want.kind()));
                // The sum of squares is taken in another order, so a last bit of the scale may
                // differ: in bf16 a rare element rounds the other way.
                if kind == Kind::Float {
                    assert!(max_difference(&got, &want) < 1e-5, "{kind:?}: {}", max_difference(&got, &want));
                } else {
                    assert!(share_differing(&got, &want) < 0.01, "{kind:?}: {}", share_differing(&got, &want));
                    assert!(max_difference(&got, &want) <= 0.0625, "{kind:?}");
                }
            }
        })
    }

    #[test]
    fn rotary_matches_the_libtorch_expression_exactly() {
        in_step(|| {
            for kind in [Kind::Float, Kind::BFloat16] {
                // [b, heads, t, hd] with two positions per sequence, tables per sequence.
                let x = random(&[3, 4, 2, 8], kind, 3);
                let (cos, sin) = (random(&[3, 2, 8], kind, 4), random(&[3, 2, 8], kind, 5));
                let got = rotary(&x, &cos, &sin).expect("few rows");
                let want = rotary_ops(&x, &cos, &sin);
                assert_eq!(share_differing(&got, &want), 0.0, "{kind:?}");
                // As the attention passes q and k in a decoding step: a projection's output
                // `[b, 1, heads * hd]` viewed as `[b, 1, heads, hd]` and transposed to `[b,
                // heads, 1, hd]` (dense, with a size-1 dimension's stride out of order), and
                // one sequence's heads cut from a fused projection (a storage offset).
                let projected = random(&[3, 1, 4 * 8], kind, 6).view([3, 1, 4, 8]).transpose(1, 2);
                let (cos1, sin1) = (cos.narrow(1, 0, 1).contiguous(), sin.narrow(1, 0, 1).contiguous());
                let fused = random(&[1, 1, 3 * 4 * 8], kind, 7).narrow(2, 4 * 8, 4 * 8).view([1, 1, 4, 8]).transpose(1, 2);
                let (cos0, sin0) = (cos1.narrow(0, 0, 1), sin1.narrow(0, 0, 1));
                for (x, c, s) in [(&projected, &cos1, &sin1), (&fused, &cos0, &sin0)] {
                    let got = rotary(x, c, s).expect("a dense layout");
                    assert_eq!(share_differing(&got, &rotary_ops(x, c, s)), 0.0, "{kind:?} {:?}", x.stride());
                }
            }
        })
    }

    #[test]
    fn anything_else_is_left_to_libtorch() {
        let w = random(&[8], Kind::Float, 6);
        let x = random(&[2, 8], Kind::Float, 11);
        // Outside a decoding step (training, evaluation, a prompt), even with grad mode off.
        assert!(tch::no_grad(|| rms_norm(&x, &w, 1e-5)).is_none());
        let _step = DecodingStep::enter();
        // Empty inputs (no rows, or rows of nothing).
        assert!(tch::no_grad(|| rms_norm(&random(&[0, 8], Kind::Float, 12), &w, 1e-5)).is_none());
        let nothing = Tensor::zeros([0], (Kind::Float, Device::Cpu));
        assert!(tch::no_grad(|| rms_norm(&Tensor::zeros([2, 0], (Kind::Float, Device::Cpu)), &nothing, 1e-5)).is_none());
        let empty_heads = Tensor::zeros([0, 4, 1, 8], (Kind::Float, Device::Cpu));
        let empty_table = Tensor::zeros([0, 1, 8], (Kind::Float, Device::Cpu));
        assert!(tch::no_grad(|| rotary(&empty_heads, &empty_table, &empty_table)).is_none());
        // Too many rows, a half-precision input, a non-contiguous one, one autograd records.
        assert!(tch::no_grad(|| rms_norm(&random(&[MAX_ROWS + 1, 8], Kind::Float, 7), &w, 1e-5)).is_none());
        let half = random(&[2, 8], Kind::Half, 8);
        assert!(tch::no_grad(|| rms_norm(&half, &half.narrow(0, 0, 1).squeeze_dim(0), 1e-5)).is_none());
        assert!(tch::no_grad(|| rms_norm(&random(&[8, 2], Kind::Float, 9).tr(), &w, 1e-5)).is_none());
        let leaf = random(&[2, 8], Kind::Float, 10).set_requires_grad(true);
        assert!(rms_norm(&leaf, &w, 1e-5).is_none());
        assert!(tch::no_grad(|| rms_norm(&leaf, &w, 1e-5)).is_some(), "grad mode off: nothing is recorded");
    }
}
