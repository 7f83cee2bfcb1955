//! One-pass CPU kernels for the elementwise work of a Llama-style layer, row by row: RMSNorm
//! forward and backward, the gated activation `silu(gate) * up` forward and backward, and
//! rotary embedding and its transpose.
//!
//! As libtorch operators RMSNorm is eight passes over its input (a cast, a square, a mean, an
//! add, a reciprocal root, two products, a cast back) and autograd's backward of it a dozen
//! more; each dispatches, and on a few rows dispatching is most of the time (about 50
//! microseconds for an RMSNorm of 16 rows of 576 in a decoding step, against a few for one
//! pass over the data), on many rows each pass reads and writes the whole tensor. A kernel
//! here reads its inputs once and writes its outputs once, rows spread over libtorch's own
//! OpenMP threads ([`crate::base::omp`]) in blocks fixed by the shape, so a result never
//! depends on the number of threads, nor on the batch a row comes in (each row's arithmetic
//! is its own).
//!
//! Each kernel rounds where the libtorch expression it replaces rounds (every libtorch
//! operator on bf16 computes in fp32 and rounds its result to bf16): rotary embedding is
//! bit-identical; RMSNorm sums its squares in another order and the activation uses its own
//! `exp` ([`crate::base::elem::exp`], within 2.5e-7 of the library's), so a last bit may
//! differ (in bf16 a rare element rounds the other way).
//!
//! The kernels take CPU tensors in fp32 or bf16, contiguous (rotary embedding: any layout whose
//! head dimension is dense), with nothing for autograd to record: the teacher's forward pass, evaluation, decoding, and the lean layers of a training
//! step ([`crate::model::causal_lm`]'s `forward_lean` / `backward_lean`, whose backward pass
//! calls the backward kernels directly). A forward pass that autograd records keeps libtorch's
//! operators. Where a kernel does not apply it returns `None`, and the caller runs the
//! libtorch expression.
use crate::base::device::autograd_records;
use crate::base::elem::{elements, exp, rounded, Bf16, Element, Output};
use crate::base::omp::parallel_tasks;
use multiversion::multiversion;
use std::cell::Cell;
use tch::{Device, Kind, Tensor};

thread_local! {
    static IN_DECODING_STEP: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside a decoding step's forward pass until dropped (libtorch's grad
/// mode is thread-local too, and the forward pass runs on the thread that calls it). The
/// kernels here do not ask; a decoding step's bf16 projections do (`gemm::small_bf16_linear`).
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

/// Whether the kernels take these tensors: all on the CPU, of one kind (fp32 or bf16),
/// contiguous and not empty, with nothing for autograd to record.
fn applies(tensors: &[&Tensor]) -> bool {
    let kind = tensors[0].kind();
    matches!(kind, Kind::Float | Kind::BFloat16)
        && tensors.iter().all(|t| t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous() && t.numel() > 0)
        && !autograd_records(tensors)
}

/// The rows of `x` when its last dimension is `dim` (not 0).
fn rows_of(x: &Tensor, dim: i64) -> Option<usize> {
    let size = x.size();
    let rows: i64 = size[..size.len().saturating_sub(1)].iter().product();
    (dim > 0 && size.last() == Some(&dim)).then_some(rows as usize)
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

/// An output that the tasks of one kernel write in disjoint row ranges.
struct Shared<T>(*mut T, usize);

// SAFETY: the tasks that share it write disjoint ranges (`rows` below), and the kernel that
// made it waits for all of them before anything else reads the memory.
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn new(out: &mut [T]) -> Shared<T> {
        Shared(out.as_mut_ptr(), out.len())
    }

    /// Elements `range` of the output.
    ///
    /// # Safety
    /// No two live slices of one `Shared` may overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn rows(&self, range: std::ops::Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.1, "rows {range:?} of {}", self.1);
        // SAFETY: within the output (checked), and disjoint from every other live slice (the
        // caller's promise).
        unsafe { std::slice::from_raw_parts_mut(self.0.add(range.start), range.len()) }
    }
}

/// One kernel's work on the rows `first .. first + count` (of `width` elements each), run by
/// [`for_row_blocks`] in the widest vector instructions the CPU has.
trait RowBlock: Sync {
    fn rows(&self, first: usize, count: usize);
}

/// `block`'s rows, compiled for the widest vector instructions the CPU has (the kernels'
/// `rows` are `#[inline(always)]`, so their loops are compiled into each copy).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx2+fma", "x86_64+avx2+fma"))]
fn rows_widest<B: RowBlock>(block: &B, first: usize, count: usize) {
    block.rows(first, count)
}

/// Rows a task: blocks of about 16K elements (64 KiB of fp32 an input), fixed by the width
/// alone so that any per-block partial sums do not depend on the thread count.
fn rows_per_task(width: usize) -> usize {
    (16_384 / width.max(1)).max(1)
}

/// Runs `block` over `rows` rows in blocks of [`rows_per_task`]: on the calling thread when
/// they are few (a decoding step's), else spread over libtorch's OpenMP threads.
fn for_row_blocks<B: RowBlock>(block: &B, rows: usize, width: usize) {
    let per = rows_per_task(width);
    let tasks = rows.div_ceil(per);
    let task = |i: usize| rows_widest(block, i * per, per.min(rows - i * per));
    if rows * width < 32_768 {
        (0..tasks).for_each(task);
    } else {
        parallel_tasks(tasks, &task);
    }
}

/// `rms_norm` of `causal_lm` (transformers' `LlamaRMSNorm`): `(x32 * rsqrt(mean(x32^2) + eps))`
/// rounded to the input's dtype, times `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Option<Tensor> {
    let dim = weight.size().first().copied()?;
    if weight.dim() != 1 || rows_of(x, dim).is_none() || !applies(&[x, weight]) {
        return None;
    }
    Some(match x.kind() {
        Kind::BFloat16 => rms_norm_rows::<Bf16>(x, weight, eps),
        _ => rms_norm_rows::<f32>(x, weight, eps),
    })
}

/// `1 / sqrt(mean(row^2) + eps)`, the sum of squares in eight partial sums (so the loop
/// vectorizes; libtorch's reduction has its own order).
#[inline(always)]
fn inverse_rms<E: Element>(row: &[E], eps: f32) -> f32 {
    let mut partial = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| v.f32() * v.f32()).sum();
    for chunk in chunks {
        for (p, v) in partial.iter_mut().zip(chunk) {
            *p += v.f32() * v.f32();
        }
    }
    let var = (partial.iter().sum::<f32>() + tail) / row.len() as f32;
    1.0 / (var + eps).sqrt()
}

/// Eight-lane dot product of two rows read as fp32 (after `f` maps each pair).
#[inline(always)]
fn dot8(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut partial = [0f32; 8];
    let whole = n / 8 * 8;
    for base in (0..whole).step_by(8) {
        for (lane, p) in partial.iter_mut().enumerate() {
            *p += f(base + lane);
        }
    }
    partial.iter().sum::<f32>() + (whole..n).map(f).sum::<f32>()
}

struct RmsNormForward<'a, E: Output> {
    x: &'a [E],
    weight: &'a [E],
    eps: f32,
    out: Shared<E>,
}

impl<E: Element + Output> RowBlock for RmsNormForward<'_, E> {
    #[inline(always)]
    fn rows(&self, first: usize, count: usize) {
        let w = self.weight;
        let h = w.len();
        // SAFETY: each task's rows are its own.
        let out = unsafe { self.out.rows(first * h..(first + count) * h) };
        for (row, out) in self.x[first * h..(first + count) * h].chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            let r = inverse_rms(row, self.eps);
            for ((o, v), g) in out.iter_mut().zip(row).zip(w) {
                *o = E::from_f32(rounded::<E>(v.f32() * r) * g.f32());
            }
        }
    }
}

fn rms_norm_rows<E: Element + Output>(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let (xs, w) = (elems::<E>(x), elems::<E>(weight));
    new_like(x, |out: &mut [E]| {
        let block = RmsNormForward { x: xs, weight: w, eps: eps as f32, out: Shared::new(out) };
        for_row_blocks(&block, xs.len() / w.len(), w.len());
    })
}

/// The backward pass of [`rms_norm`] at `x` for the output's gradient `dy`: the input's
/// gradient plus `add` (a residual's gradient, rounded as autograd adds one gradient into
/// another), and the weight's gradient in fp32 (summed over the rows; the caller adds it into
/// the weight's `.grad`). `None` where the kernel does not apply (see the module).
///
/// With `r = rsqrt(mean(x^2) + eps)`, `n = x r` (rounded to the dtype) and `dn = dy w` (also):
/// `dx = r dn - x r^3 mean(dn x)`, `dw = sum over rows of dy n`.
pub fn rms_norm_backward(x: &Tensor, weight: &Tensor, dy: &Tensor, eps: f64, add: Option<&Tensor>) -> Option<(Tensor, Tensor)> {
    let dim = weight.size().first().copied()?;
    let mut all = vec![x, weight, dy];
    all.extend(add);
    if weight.dim() != 1 || rows_of(x, dim).is_none() || dy.size() != x.size() || add.is_some_and(|a| a.size() != x.size()) || !applies(&all) {
        return None;
    }
    Some(match x.kind() {
        Kind::BFloat16 => rms_norm_backward_rows::<Bf16>(x, weight, dy, eps, add),
        _ => rms_norm_backward_rows::<f32>(x, weight, dy, eps, add),
    })
}

struct RmsNormBackward<'a, E: Output> {
    x: &'a [E],
    weight: &'a [E],
    dy: &'a [E],
    add: Option<&'a [E]>,
    eps: f32,
    dx: Shared<E>,
    /// One row of weight-gradient partial sums per task.
    dw: Shared<f32>,
}

impl<E: Element + Output> RowBlock for RmsNormBackward<'_, E> {
    #[inline(always)]
    fn rows(&self, first: usize, count: usize) {
        let w = self.weight;
        let h = w.len();
        let span = first * h..(first + count) * h;
        // SAFETY: each task's rows, and its own row of partial sums.
        let task = first / rows_per_task(h);
        let (dx, dw) = unsafe { (self.dx.rows(span.clone()), self.dw.rows(task * h..(task + 1) * h)) };
        dw.fill(0.0);
        let adds = self.add.map(|a| &a[span.clone()]);
        for (i, ((x, dy), dx)) in self.x[span.clone()].chunks_exact(h).zip(self.dy[span.clone()].chunks_exact(h)).zip(dx.chunks_exact_mut(h)).enumerate() {
            let r = inverse_rms(x, self.eps);
            // dn = dy w as the product's backward leaves it (in the dtype); its dot with x.
            let dn = |j: usize| rounded::<E>(dy[j].f32() * w[j].f32());
            let dot = dot8(h, |j| dn(j) * x[j].f32());
            let c = r * r * r * dot / h as f32;
            for ((g, v), d) in dw.iter_mut().zip(x).zip(dy) {
                *g += rounded::<E>(d.f32() * rounded::<E>(v.f32() * r));
            }
            match adds {
                Some(a) => {
                    for ((((o, v), d), g), a) in dx.iter_mut().zip(x).zip(dy).zip(w).zip(&a[i * h..(i + 1) * h]) {
                        let dn = rounded::<E>(d.f32() * g.f32());
                        *o = E::from_f32(rounded::<E>(r * dn - v.f32() * c) + a.f32());
                    }
                }
                None => {
                    for (((o, v), d), g) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                        let dn = rounded::<E>(d.f32() * g.f32());
                        *o = E::from_f32(r * dn - v.f32() * c);
                    }
                }
            }
        }
    }
}

fn rms_norm_backward_rows<E: Element + Output>(x: &Tensor, weight: &Tensor, dy: &Tensor, eps: f64, add: Option<&Tensor>) -> (Tensor, Tensor) {
    let w = elems::<E>(weight);
    let h = w.len();
    let rows = x.numel() / h;
    let tasks = rows.div_ceil(rows_per_task(h));
    let mut partial = vec![0f32; tasks * h];
    let dx = new_like(x, |dx: &mut [E]| {
        let block = RmsNormBackward {
            x: elems::<E>(x),
            weight: w,
            dy: elems::<E>(dy),
            add: add.map(elems::<E>),
            eps: eps as f32,
            dx: Shared::new(dx),
            dw: Shared::new(&mut partial),
        };
        for_row_blocks(&block, rows, h);
    });
    // The blocks' partial sums in block order: the same whatever thread ran which.
    let mut dw = vec![0f32; h];
    for part in partial.chunks_exact(h) {
        for (s, p) in dw.iter_mut().zip(part) {
            *s += p;
        }
    }
    (dx, Tensor::from_slice(&dw))
}

/// `silu(x) = x / (1 + e^-x)` and the sigmoid `1 / (1 + e^-x)` it is made of.
#[inline(always)]
fn silu_and_sigmoid(x: f32) -> (f32, f32) {
    // Past exp's range the library's e^-x is infinite: silu -0 and the sigmoid 0, as there.
    let d = 1.0 + if x < -88.3 { f32::INFINITY } else { exp(-x) };
    (x / d, 1.0 / d)
}

/// `silu(gate) * up` (`gate`, `up` of one shape), as `activate(gate) * up` computes it
/// (the activation rounded to the dtype before the product).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Option<Tensor> {
    if gate.size() != up.size() || !applies(&[gate, up]) {
        return None;
    }
    Some(match gate.kind() {
        Kind::BFloat16 => silu_mul_rows::<Bf16>(gate, up),
        _ => silu_mul_rows::<f32>(gate, up),
    })
}

struct SiluMulForward<'a, E: Output> {
    gate: &'a [E],
    up: &'a [E],
    width: usize,
    out: Shared<E>,
}

impl<E: Element + Output> RowBlock for SiluMulForward<'_, E> {
    #[inline(always)]
    fn rows(&self, first: usize, count: usize) {
        let span = first * self.width..(first + count) * self.width;
        // SAFETY: each task's rows are its own.
        let out = unsafe { self.out.rows(span.clone()) };
        for ((o, g), u) in out.iter_mut().zip(&self.gate[span.clone()]).zip(&self.up[span]) {
            *o = E::from_f32(rounded::<E>(silu_and_sigmoid(g.f32()).0) * u.f32());
        }
    }
}

fn silu_mul_rows<E: Element + Output>(gate: &Tensor, up: &Tensor) -> Tensor {
    let width = *gate.size().last().unwrap() as usize;
    new_like(gate, |out: &mut [E]| {
        let block = SiluMulForward { gate: elems::<E>(gate), up: elems::<E>(up), width, out: Shared::new(out) };
        for_row_blocks(&block, gate.numel() / width, width);
    })
}

/// The backward pass of [`silu_mul`] for the product's gradient `dp`: the gradients of `gate`
/// and `up`, as autograd computes them (`du = dp silu(g)`, `dg = (dp u) s (1 + g (1 - s))`
/// with `s` the sigmoid, each product rounded to the dtype where autograd's would be).
pub fn silu_mul_backward(gate: &Tensor, up: &Tensor, dp: &Tensor) -> Option<(Tensor, Tensor)> {
    if gate.size() != up.size() || dp.size() != gate.size() || !applies(&[gate, up, dp]) {
        return None;
    }
    Some(match gate.kind() {
        Kind::BFloat16 => silu_mul_backward_rows::<Bf16>(gate, up, dp),
        _ => silu_mul_backward_rows::<f32>(gate, up, dp),
    })
}

struct SiluMulBackward<'a, E: Output> {
    gate: &'a [E],
    up: &'a [E],
    dp: &'a [E],
    width: usize,
    d_gate: Shared<E>,
    d_up: Shared<E>,
}

impl<E: Element + Output> RowBlock for SiluMulBackward<'_, E> {
    #[inline(always)]
    fn rows(&self, first: usize, count: usize) {
        let span = first * self.width..(first + count) * self.width;
        // SAFETY: each task's rows are its own.
        let (dg, du) = unsafe { (self.d_gate.rows(span.clone()), self.d_up.rows(span.clone())) };
        for ((((dg, du), g), u), d) in dg.iter_mut().zip(du).zip(&self.gate[span.clone()]).zip(&self.up[span.clone()]).zip(&self.dp[span]) {
            let (g, d) = (g.f32(), d.f32());
            let (silu, s) = silu_and_sigmoid(g);
            *du = E::from_f32(d * rounded::<E>(silu));
            *dg = E::from_f32(rounded::<E>(d * u.f32()) * (s * (1.0 + g * (1.0 - s))));
        }
    }
}

fn silu_mul_backward_rows<E: Element + Output>(gate: &Tensor, up: &Tensor, dp: &Tensor) -> (Tensor, Tensor) {
    let width = *gate.size().last().unwrap() as usize;
    let d_up = Tensor::empty(gate.size(), (gate.kind(), Device::Cpu));
    // SAFETY: `d_up` was just allocated contiguous with `numel` elements of `E`'s kind.
    let d_up_elems = unsafe { std::slice::from_raw_parts_mut(d_up.data_ptr() as *mut E, d_up.numel()) };
    let d_gate = new_like(gate, |dg: &mut [E]| {
        let block = SiluMulBackward { gate: elems::<E>(gate), up: elems::<E>(up), dp: elems::<E>(dp), width, d_gate: Shared::new(dg), d_up: Shared::new(d_up_elems) };
        for_row_blocks(&block, gate.numel() / width, width);
    });
    (d_gate, d_up)
}

/// Which way [`rotary`] turns each head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rotation {
    /// `x cos + rotate_half(x) sin`, as transformers' `apply_rotary_pos_emb`.
    Forward,
    /// Its transpose, for a backward pass: `g cos - rotate_half(g sin)` (`rotate_half^T =
    /// -rotate_half`).
    Transpose,
}

/// Rotary embedding as `causal_lm` applies it, where `rotate_half` is `[-x2, x1]` of the two
/// halves of each head (or its transpose): `x` `[b, heads, t, hd]` with the head dimension
/// dense (any order of the others, as the attention's transposed projections are), `cos` and
/// `sin` `[b, t, hd]`. The result is `[b, heads, t, hd]` over memory `[b, t, heads, hd]` (where
/// a projection's output has it, so SDPA reads it as before and a backward pass's gradient is
/// already in its rows' order). Bit-identical to the libtorch expression.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor, rotation: Rotation) -> Option<Tensor> {
    let (b, _, t, hd) = x.size4().ok()?;
    let kind = x.kind();
    let dense_heads = x.stride()[3] == 1 && x.stride().iter().all(|&s| s >= 0);
    let tables_ok = cos.size() == [b, t, hd] && sin.size() == [b, t, hd] && applies(&[cos, sin]) && cos.kind() == kind;
    let x_ok = matches!(kind, Kind::Float | Kind::BFloat16) && x.device() == Device::Cpu && x.numel() > 0 && !autograd_records(&[x]);
    if hd % 2 != 0 || !dense_heads || !tables_ok || !x_ok {
        return None;
    }
    Some(match kind {
        Kind::BFloat16 => rotary_heads::<Bf16>(x, cos, sin, rotation),
        _ => rotary_heads::<f32>(x, cos, sin, rotation),
    })
}

struct Rotary<'a, E: Output> {
    /// The memory `x` spans, from its first element.
    x: &'a [E],
    strides: [usize; 3],
    cos: &'a [E],
    sin: &'a [E],
    /// `[b, heads, t, hd]`.
    shape: [usize; 4],
    rotation: Rotation,
    out: Shared<E>,
}

impl<E: Element + Output> RowBlock for Rotary<'_, E> {
    #[inline(always)]
    fn rows(&self, first: usize, count: usize) {
        let [_, heads, t, hd] = self.shape;
        let half = hd / 2;
        let rotate = |x: f32, c: E, x_other: f32, s: E| E::from_f32(rounded::<E>(x * c.f32()) + rounded::<E>(x_other * s.f32()));
        for n in first..first + count {
            // Row n is (batch, head, position); cos and sin are shared by the heads.
            let (bi, hi, ti) = (n / (heads * t), n / t % heads, n % t);
            let at = bi * self.strides[0] + hi * self.strides[1] + ti * self.strides[2];
            let row = &self.x[at..at + hd];
            let table = (bi * t + ti) * hd;
            let (c, s) = (&self.cos[table..table + hd], &self.sin[table..table + hd]);
            // SAFETY: each (batch, position, head) row of the output is written by one row here.
            let out = unsafe { self.out.rows(((bi * t + ti) * heads + hi) * hd..((bi * t + ti) * heads + hi + 1) * hd) };
            let ((lo, hi), (out_lo, out_hi)) = (row.split_at(half), out.split_at_mut(half));
            let ((c_lo, c_hi), (s_lo, s_hi)) = (c.split_at(half), s.split_at(half));
            // Iterators, not indices: no bounds checks, so the loops vectorize. Forward:
            // lo cos - hi sin | hi cos + lo sin; transpose: lo cos + hi sin' | hi cos - lo sin',
            // with sin' the other half's entries of the table (`rotate_half(g sin)`).
            let (s_for_lo, s_for_hi) = match self.rotation {
                Rotation::Forward => (s_lo, s_hi),
                Rotation::Transpose => (s_hi, s_lo),
            };
            let sign = if self.rotation == Rotation::Forward { -1.0 } else { 1.0 };
            for ((((o, x), other), c), s) in out_lo.iter_mut().zip(lo).zip(hi).zip(c_lo).zip(s_for_lo) {
                *o = rotate(x.f32(), *c, sign * other.f32(), *s);
            }
            for ((((o, x), other), c), s) in out_hi.iter_mut().zip(hi).zip(lo).zip(c_hi).zip(s_for_hi) {
                *o = rotate(x.f32(), *c, -sign * other.f32(), *s);
            }
        }
    }
}

fn rotary_heads<E: Element + Output>(x: &Tensor, cos: &Tensor, sin: &Tensor, rotation: Rotation) -> Tensor {
    let size: Vec<usize> = x.size().iter().map(|&d| d as usize).collect();
    let stride: Vec<usize> = x.stride().iter().map(|&d| d as usize).collect();
    let [b, heads, t, hd] = [size[0], size[1], size[2], size[3]];
    // The elements from x's first to its last (strides checked non-negative by the caller).
    let span = 1 + size.iter().zip(&stride).map(|(n, s)| (n - 1) * s).sum::<usize>();
    // SAFETY: a CPU tensor of `E`'s kind (checked by the caller) whose elements all lie within
    // `span` elements of its data pointer; read only, while `x` is borrowed.
    let xs = unsafe { std::slice::from_raw_parts(x.data_ptr() as *const E, span) };
    let out = Tensor::empty([b as i64, t as i64, heads as i64, hd as i64], (x.kind(), Device::Cpu));
    // SAFETY: `out` was just allocated contiguous with `numel` elements of `E`'s kind.
    let out_elems = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut E, out.numel()) };
    let block = Rotary {
        x: xs,
        strides: [stride[0], stride[1], stride[2]],
        cos: elems::<E>(cos),
        sin: elems::<E>(sin),
        shape: [b, heads, t, hd],
        rotation,
        out: Shared::new(out_elems),
    };
    for_row_blocks(&block, b * heads * t, hd);
    out.transpose(1, 2)
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
        // The transpose as the lean backward pass wrote it in operators: g cos - rotate_half(g sin).
        let transpose_ops = |g: &Tensor, cos: &Tensor, sin: &Tensor| {
            let (cos, sin) = (cos.unsqueeze(1), sin.unsqueeze(1));
            let gs = g * &sin;
            let half = gs.size()[3] / 2;
            g * &cos - Tensor::cat(&[gs.narrow(3, half, half).neg(), gs.narrow(3, 0, half)], 3)
        };
        in_step(|| {
            for kind in [Kind::Float, Kind::BFloat16] {
                // [b, heads, t, hd] with two positions per sequence, tables per sequence.
                let x = random(&[3, 4, 2, 8], kind, 3);
                let (cos, sin) = (random(&[3, 2, 8], kind, 4), random(&[3, 2, 8], kind, 5));
                let got = rotary(&x, &cos, &sin, Rotation::Forward).expect("CPU tensors without records");
                assert_eq!(share_differing(&got, &rotary_ops(&x, &cos, &sin)), 0.0, "{kind:?}");
                let got = rotary(&x, &cos, &sin, Rotation::Transpose).unwrap();
                assert_eq!(share_differing(&got, &transpose_ops(&x, &cos, &sin)), 0.0, "{kind:?} transpose");
                // As the attention passes q and k in a decoding step: a projection's output
                // `[b, 1, heads * hd]` viewed as `[b, 1, heads, hd]` and transposed to `[b,
                // heads, 1, hd]` (dense, with a size-1 dimension's stride out of order), and
                // one sequence's heads cut from a fused projection (a storage offset).
                let projected = random(&[3, 1, 4 * 8], kind, 6).view([3, 1, 4, 8]).transpose(1, 2);
                let (cos1, sin1) = (cos.narrow(1, 0, 1).contiguous(), sin.narrow(1, 0, 1).contiguous());
                let fused = random(&[1, 1, 3 * 4 * 8], kind, 7).narrow(2, 4 * 8, 4 * 8).view([1, 1, 4, 8]).transpose(1, 2);
                let (cos0, sin0) = (cos1.narrow(0, 0, 1), sin1.narrow(0, 0, 1));
                // As a training step's forward pass has them: [b, t, heads, hd] memory over many
                // rows (spread over the threads), and a backward pass's contiguous gradients.
                let training = random(&[4, 64, 9, 64], kind, 8).transpose(1, 2);
                let (cos_t, sin_t) = (random(&[4, 64, 64], kind, 9), random(&[4, 64, 64], kind, 10));
                let gradient = random(&[4, 3, 64, 64], kind, 11);
                for (x, c, s) in [(&projected, &cos1, &sin1), (&fused, &cos0, &sin0), (&training, &cos_t, &sin_t), (&gradient, &cos_t, &sin_t)] {
                    let got = rotary(x, c, s, Rotation::Forward).expect("a dense head dimension");
                    assert_eq!(share_differing(&got, &rotary_ops(x, c, s)), 0.0, "{kind:?} {:?}", x.stride());
                    let got = rotary(x, c, s, Rotation::Transpose).unwrap();
                    assert_eq!(share_differing(&got, &transpose_ops(x, c, s)), 0.0, "{kind:?} {:?} transpose", x.stride());
                    // Its memory is [b, t, heads, hd]: the rows of a projection's gradient.
                    assert!(got.transpose(1, 2).is_contiguous());
                }
            }
        })
    }

    #[test]
    fn anything_else_is_left_to_libtorch() {
        let w = random(&[8], Kind::Float, 6);
        let (cos, sin) = (random(&[1, 2, 8], Kind::Float, 13), random(&[1, 2, 8], Kind::Float, 14));
        // Outside a decoding step too (training, evaluation, a prompt), at any number of rows,
        // where nothing is recorded.
        let x = random(&[1, 4, 2, 8], Kind::Float, 15);
        assert!(tch::no_grad(|| rotary(&x, &cos, &sin, Rotation::Forward)).is_some());
        assert!(tch::no_grad(|| rms_norm(&random(&[100, 8], Kind::Float, 7), &w, 1e-5)).is_some());
        // Empty inputs (no rows, or rows of nothing).
        assert!(tch::no_grad(|| rms_norm(&random(&[0, 8], Kind::Float, 12), &w, 1e-5)).is_none());
        let nothing = Tensor::zeros([0], (Kind::Float, Device::Cpu));
        assert!(tch::no_grad(|| rms_norm(&Tensor::zeros([2, 0], (Kind::Float, Device::Cpu)), &nothing, 1e-5)).is_none());
        let empty_heads = Tensor::zeros([0, 4, 1, 8], (Kind::Float, Device::Cpu));
        let empty_table = Tensor::zeros([0, 1, 8], (Kind::Float, Device::Cpu));
        assert!(tch::no_grad(|| rotary(&empty_heads, &empty_table, &empty_table, Rotation::Forward)).is_none());
        // An odd head size, a head dimension that is not dense, tables of another kind; a
        // half-precision input, a non-contiguous one, one autograd records.
        assert!(tch::no_grad(|| rotary(&random(&[1, 4, 2, 7], Kind::Float, 16), &cos.narrow(2, 0, 7), &sin.narrow(2, 0, 7), Rotation::Forward)).is_none());
        assert!(tch::no_grad(|| rotary(&random(&[1, 4, 8, 2], Kind::Float, 17).transpose(2, 3), &cos, &sin, Rotation::Forward)).is_none());
        assert!(tch::no_grad(|| rotary(&x, &cos.to_kind(Kind::BFloat16), &sin.to_kind(Kind::BFloat16), Rotation::Forward)).is_none());
        assert!(rotary(&x.set_requires_grad(true), &cos, &sin, Rotation::Forward).is_none());
        let half = random(&[2, 8], Kind::Half, 8);
        assert!(tch::no_grad(|| rms_norm(&half, &half.narrow(0, 0, 1).squeeze_dim(0), 1e-5)).is_none());
        assert!(tch::no_grad(|| rms_norm(&random(&[8, 2], Kind::Float, 9).tr(), &w, 1e-5)).is_none());
        let leaf = random(&[2, 8], Kind::Float, 10).set_requires_grad(true);
        assert!(rms_norm(&leaf, &w, 1e-5).is_none());
        assert!(tch::no_grad(|| rms_norm(&leaf, &w, 1e-5)).is_some(), "grad mode off: nothing is recorded");
    }

    /// Gradients of `f`'s output for `grad` with respect to `inputs`, by libtorch's autograd.
    fn autograd(inputs: &[&Tensor], grad: &Tensor, f: impl Fn(&[Tensor]) -> Tensor) -> Vec<Tensor> {
        let leaves: Vec<Tensor> = inputs.iter().map(|t| t.detach().set_requires_grad(true)).collect();
        (f(&leaves) * grad).sum(Kind::Float).backward();
        leaves.iter().map(Tensor::grad).collect()
    }

    /// Largest difference over the largest entry of `want`.
    fn relative(got: &Tensor, want: &Tensor) -> f64 {
        max_difference(got, want) / want.to_kind(Kind::Float).abs().max().double_value(&[])
    }

    /// Rows of 576 and 37 (not a multiple of the eight lanes); 5 rows (one task, on the
    /// calling thread) and 1024 (many tasks, spread over the threads).
    const SHAPES: [[i64; 3]; 4] = [[1, 5, 576], [4, 256, 576], [1, 5, 37], [8, 128, 37]];

    #[test]
    fn rms_norm_backward_matches_autograd() {
        for kind in [Kind::Float, Kind::BFloat16] {
            for (n, shape) in SHAPES.iter().enumerate() {
                let seed = 100 + 10 * n as i64;
                let h = shape[2];
                let (x, w, dy, res) = (random(shape, kind, seed), random(&[h], kind, seed + 1), random(shape, kind, seed + 2), random(shape, kind, seed + 3));
                let want = autograd(&[&x, &w], &dy, |t| rms_norm_ops(&t[0], &t[1], 1e-5));
                let want_dx = (&want[0] + &res).to_kind(kind);
                let (dx, dw) = tch::no_grad(|| rms_norm_backward(&x, &w, &dy, 1e-5, Some(&res))).expect("CPU tensors without records");
                let (dx_alone, _) = tch::no_grad(|| rms_norm_backward(&x, &w, &dy, 1e-5, None)).unwrap();
                assert_eq!((dx.size(), dx.kind(), dw.kind()), (x.size(), kind, Kind::Float));
                let tolerance = if kind == Kind::Float { 1e-5 } else { 2e-2 };
                for (what, got, want) in [("dx", &dx, &want_dx), ("dx alone", &dx_alone, &want[0]), ("dw", &dw, &want[1])] {
                    let r = relative(got, want);
                    assert!(r < tolerance, "{kind:?} {shape:?} {what}: {r}");
                }
            }
        }
    }

    #[test]
    fn silu_mul_and_its_backward_match_the_libtorch_expression() {
        for kind in [Kind::Float, Kind::BFloat16] {
            for (n, shape) in SHAPES.iter().enumerate() {
                let seed = 200 + 10 * n as i64;
                let (g, u, dp) = (random(shape, kind, seed), random(shape, kind, seed + 1), random(shape, kind, seed + 2));
                let got = tch::no_grad(|| silu_mul(&g, &u)).expect("CPU tensors without records");
                let want = g.silu() * &u;
                let want_grads = autograd(&[&g, &u], &dp, |t| t[0].silu() * &t[1]);
                let (dg, du) = tch::no_grad(|| silu_mul_backward(&g, &u, &dp)).unwrap();
                if kind == Kind::Float {
                    for (what, got, want) in [("product", &got, &want), ("d gate", &dg, &want_grads[0]), ("d up", &du, &want_grads[1])] {
                        let r = relative(got, want);
                        assert!(r < 1e-6, "{shape:?} {what}: {r}");
                    }
                } else {
                    // The exponential's last bit: a rare bf16 element rounds the other way.
                    for (what, got, want) in [("product", &got, &want), ("d gate", &dg, &want_grads[0]), ("d up", &du, &want_grads[1])] {
                        assert!(share_differing(got, want) < 0.01, "{shape:?} {what}: {}", share_differing(got, want));
                        assert!(relative(got, want) < 1e-2, "{shape:?} {what}: {}", relative(got, want));
                    }
                }
            }
        }
        // A NaN stays a NaN; gates past the exponential's range give libtorch's values (between
        // -88.72 and -88.3, where the library's e^-x is still finite, ours is infinite: -0
        // against a product below 1e-36).
        let g = Tensor::from_slice(&[f32::NAN, -100.0, -90.0, 100.0, 0.0]);
        let u = Tensor::from_slice(&[1f32, 2.0, 3.0, 4.0, 5.0]);
        let p: Vec<f32> = Vec::try_from(&tch::no_grad(|| silu_mul(&g, &u)).unwrap()).unwrap();
        let want: Vec<f32> = Vec::try_from(&(g.silu() * &u)).unwrap();
        assert!(p[0].is_nan());
        assert_eq!(p[1..].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want[1..].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{p:?} {want:?}");
    }

    #[test]
    fn training_kernels_refuse_what_they_do_not_take() {
        let (x, w) = (random(&[4, 8], Kind::Float, 1), random(&[8], Kind::Float, 2));
        // Mismatched shapes, mixed kinds, a half-precision input, a recorded one.
        assert!(tch::no_grad(|| rms_norm_backward(&x, &w, &random(&[4, 7], Kind::Float, 3), 1e-5, None)).is_none());
        assert!(tch::no_grad(|| rms_norm_backward(&x, &w, &x, 1e-5, Some(&random(&[2, 8], Kind::Float, 4)))).is_none());
        assert!(tch::no_grad(|| rms_norm_backward(&x, &w, &x.to_kind(Kind::BFloat16), 1e-5, None)).is_none());
        assert!(tch::no_grad(|| silu_mul(&x, &random(&[4, 7], Kind::Float, 5))).is_none());
        let half = x.to_kind(Kind::Half);
        assert!(tch::no_grad(|| silu_mul_backward(&half, &half, &half)).is_none());
        let leaf = x.set_requires_grad(true);
        assert!(silu_mul(&leaf, &x).is_none());
    }
}
