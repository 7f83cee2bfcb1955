//! CPU kernels for the elementwise work of a decoding step, where each layer sees a few rows
//! (one token per sequence). There libtorch spends more time dispatching small operators than
//! computing them: RMSNorm is eight operators and rotary embedding six per tensor, about 50
//! microseconds for an RMSNorm of 16 rows of 576 against a few for one pass over the data.
//! Each kernel here does one pass with the arithmetic and the roundings of the libtorch
//! expression it replaces (every libtorch op on bf16 computes in fp32 and rounds its result to
//! bf16, so the kernels round at the same points), and applies only where that expression
//! would: CPU tensors in fp32 or bf16, at most [`MAX_ROWS`] rows, with no gradient wanted.
//! Anything else gets `None`, and the caller runs the libtorch expression.
use crate::base::device::autograd_records;
use crate::base::elem::{rounded, Bf16, Element, Output};
use tch::{Device, Kind, Tensor};

/// The most rows (positions across the batch) a kernel takes: a decoding step's batch. Larger
/// inputs are prompts and training batches, where libtorch's operators are worth their
/// dispatch and run on every core.
pub const MAX_ROWS: i64 = 32;

/// Whether the kernels take these tensors: all on the CPU, of one kind (fp32 or bf16),
/// contiguous, with nothing for autograd to record.
fn applies(tensors: &[&Tensor]) -> bool {
    let kind = tensors[0].kind();
    matches!(kind, Kind::Float | Kind::BFloat16)
        && tensors.iter().all(|t| t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous())
        && !autograd_records(tensors)
}

/// The rows of `x` when its last dimension is `dim` and it has at most [`MAX_ROWS`] of them.
fn small_rows(x: &Tensor, dim: i64) -> Option<i64> {
    let size = x.size();
    let rows: i64 = size[..size.len().saturating_sub(1)].iter().product();
    (size.last() == Some(&dim) && rows <= MAX_ROWS).then_some(rows)
}

/// A CPU tensor's elements. Callers have checked it is contiguous and of kind `E`.
fn elems<E: Element>(t: &Tensor) -> &[E] {
    // SAFETY: a contiguous CPU tensor of `numel` elements of `E`'s size and layout (fp32 is
    // `f32`, bf16 is `Bf16`, `repr(transparent)` over its bits), alive for `t`'s borrow.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const E, t.numel()) }
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

    #[test]
    fn rms_norm_matches_the_libtorch_expression() {
        tch::no_grad(|| {
            for kind in [Kind::Float, Kind::BFloat16] {
                let (x, w) = (random(&[16, 1, 576], kind, 1), random(&[576], kind, 2));
                let (got, want) = (rms_norm(&x, &w, 1e-5).expect("a decoding step's rows"), rms_norm_ops(&x, &w, 1e-5));
                assert_eq!((got.size(), got.kind()), (want.size(), want.kind()));
                // The sum of squares is taken in another order (and in f64), so a last bit of
                // the scale may differ: in bf16 a rare element rounds the other way.
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
        tch::no_grad(|| {
            for kind in [Kind::Float, Kind::BFloat16] {
                // [b, heads, t, hd] with two positions per sequence, tables per sequence.
                let x = random(&[3, 4, 2, 8], kind, 3);
                let (cos, sin) = (random(&[3, 2, 8], kind, 4), random(&[3, 2, 8], kind, 5));
                let got = rotary(&x, &cos, &sin).expect("few rows");
                let want = rotary_ops(&x, &cos, &sin);
                assert_eq!(share_differing(&got, &want), 0.0, "{kind:?}");
            }
        })
    }

    #[test]
    fn anything_else_is_left_to_libtorch() {
        let w = random(&[8], Kind::Float, 6);
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
