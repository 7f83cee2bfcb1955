//! Two matrix products libtorch 2.11 has no fast op for, both through MKL's
//! `cblas_gemm_bf16bf16f32` on the CPU (bf16 operands, fp32 accumulation and output), which
//! the torch wheel's `libtorch_cpu.so` carries and exports. It is looked up at run time, so a
//! libtorch built without MKL simply reports the product unavailable and callers keep
//! libtorch's own ops.
//!
//! * [`addmm_bf16_into_f32`]: bf16 x bf16 added into an fp32 matrix with fp32 accumulation
//!   throughout, which a bf16 model's fp32 master gradients want (rounding the product to bf16
//!   first would make small gradient entries cancel, and the fp32 product runs at half the
//!   rate or less). CUDA: `addmm.dtype_out` (cuBLAS, tensor cores); CPU: MKL (`addmm.dtype` has
//!   no CPU kernel).
//! * [`small_bf16_linear`]: a bf16 projection of a few rows, as each step of generation makes:
//!   at 8-32 rows MKL's routine takes 20-45% less time than libtorch's linear (oneDNN) at
//!   SmolLM2's layer shapes; from about 48 rows oneDNN is faster (docs/BENCHMARKS.md, "What
//!   bounds generation on the CPU").
//!
//! [`bf16_gemm_accumulates_in_fp32`] checks the product once per device against fp32
//! arithmetic before anything relies on it.
use std::ffi::c_int;
use std::sync::{Mutex, OnceLock};
use tch::{Device, Kind, Tensor};

/// `cblas_gemm_bf16bf16f32` (MKL, LP64: 32-bit integers): `c = alpha * op(a) op(b) + beta * c`,
/// `a` and `b` bf16 as `u16`, `c` fp32.
type GemmBf16Bf16F32 = unsafe extern "C" fn(
    layout: c_int,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const u16,
    lda: c_int,
    b: *const u16,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
);

const CBLAS_ROW_MAJOR: c_int = 101;
const CBLAS_NO_TRANS: c_int = 111;
const CBLAS_TRANS: c_int = 112;

fn mkl_gemm_bf16() -> Option<GemmBf16Bf16F32> {
    static FOUND: OnceLock<Option<GemmBf16Bf16F32>> = OnceLock::new();
    *FOUND.get_or_init(|| {
        // SAFETY: dlsym over the process's global symbols (libtorch_cpu.so is linked, so it is
        // among them) with a valid C string; a non-null result is MKL's function of the type above.
        let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"cblas_gemm_bf16bf16f32".as_ptr()) };
        (!f.is_null()).then(|| unsafe { std::mem::transmute::<*mut libc::c_void, GemmBf16Bf16F32>(f) })
    })
}

/// How a 2-D tensor is laid out for BLAS: `(transposed, leading dimension)`, or `None` when
/// neither dimension is unit-stride.
fn blas_layout(t: &Tensor) -> Option<(bool, i64)> {
    let (size, stride) = (t.size(), t.stride());
    let (rows, cols) = (size[0], size[1]);
    if stride[1] == 1 && stride[0] >= cols.max(1) {
        Some((false, stride[0]))
    } else if stride[0] == 1 && stride[1] >= rows.max(1) {
        // A transposed view of a row-major `[cols, rows]` matrix.
        Some((true, stride[1]))
    } else {
        None
    }
}

/// `acc += a @ b` through MKL on the CPU: `a` `[m, k]` and `b` `[k, n]` bf16 (row-major or
/// transposed views, as they come), `acc` a contiguous fp32 `[m, n]`. False, with nothing
/// done, when MKL's routine is absent or the shapes do not fit it.
fn cpu_addmm_bf16_into_f32(acc: &Tensor, a: &Tensor, b: &Tensor) -> bool {
    cpu_gemm_bf16_f32(acc, a, b, 1.0)
}

/// `out = a @ b + beta * out` through MKL (see [`cpu_addmm_bf16_into_f32`]).
fn cpu_gemm_bf16_f32(out: &Tensor, a: &Tensor, b: &Tensor, beta: f32) -> bool {
    let Some(gemm) = mkl_gemm_bf16() else { return false };
    let fits = |t: &Tensor, kind: Kind| t.device() == Device::Cpu && t.kind() == kind && t.dim() == 2;
    if !(fits(out, Kind::Float) && fits(a, Kind::BFloat16) && fits(b, Kind::BFloat16) && out.is_contiguous()) {
        return false;
    }
    let (m, k, n) = (a.size()[0], a.size()[1], b.size()[1]);
    if b.size()[0] != k || out.size() != [m, n] || [m, n, k].iter().any(|&d| d > i64::from(c_int::MAX)) {
        return false;
    }
    if m == 0 || n == 0 || k == 0 {
        return true;
    }
    let (a, b) = (layout_or_copy(a), layout_or_copy(b));
    let ((ta, lda), (tb, ldb)) = (a.1, b.1);
    if lda > i64::from(c_int::MAX) || ldb > i64::from(c_int::MAX) {
        return false;
    }
    let trans = |t: bool| if t { CBLAS_TRANS } else { CBLAS_NO_TRANS };
    // SAFETY: every pointer is to a live CPU tensor of the dtype the routine reads or writes
    // (bf16 is 16-bit, fp32 is `f32`), with the dimensions and leading dimensions of its
    // layout checked above; `out` is contiguous `[m, n]` and not aliased by `a` or `b` (their
    // dtypes differ).
    unsafe {
        gemm(
            CBLAS_ROW_MAJOR,
            trans(ta),
            trans(tb),
            m as c_int,
            n as c_int,
            k as c_int,
            1.0,
            a.0.data_ptr() as *const u16,
            lda as c_int,
            b.0.data_ptr() as *const u16,
            ldb as c_int,
            beta,
            out.data_ptr() as *mut f32,
            n as c_int,
        );
    }
    true
}

/// Up to this many rows a bf16 projection goes through MKL ([`small_bf16_linear`]): measured
/// faster than oneDNN at 8-32 rows, slower from 48.
pub const SMALL_LINEAR_ROWS: i64 = 32;

/// Whether the CPU multiplies bf16 in hardware (AVX512-BF16; every CPU with AMX has it too),
/// as where MKL's routine was measured against oneDNN (an AMX machine); elsewhere both convert
/// in software, unmeasured, and [`small_bf16_linear`] leaves the product to libtorch.
fn cpu_has_bf16_products() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `x @ weight^T + bias` in bf16 through MKL when it is the faster route: `x` `[.., k]` bf16
/// on the CPU with at most [`SMALL_LINEAR_ROWS`] rows, `weight` `[n, k]` and `bias` `[n]`
/// bf16, and no gradient wanted (grad mode off, or no operand requires one: the product is
/// not recorded for autograd). The bias is added to the fp32 product and the sum rounded to
/// bf16 once, as libtorch's linear rounds its fp32 accumulator. `None` where any of that does
/// not hold; the caller uses libtorch's linear.
pub fn small_bf16_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Option<Tensor> {
    let cpu_bf16 = |t: &Tensor| t.kind() == Kind::BFloat16 && t.device() == Device::Cpu;
    if !(cpu_bf16(x) && cpu_bf16(weight) && weight.dim() == 2 && x.dim() >= 1 && bias.is_none_or(cpu_bf16)) {
        return None;
    }
    let (n, k) = (weight.size()[0], weight.size()[1]);
    let dims = x.size();
    if dims[dims.len() - 1] != k || bias.is_some_and(|b| b.size() != [n]) {
        return None;
    }
    let rows = dims[..dims.len() - 1].iter().product::<i64>();
    if rows == 0 || n == 0 || k == 0 || rows > SMALL_LINEAR_ROWS || !cpu_has_bf16_products()
        || crate::base::device::autograd_records(&[x, weight])
        || bias.is_some_and(|b| crate::base::device::autograd_records(&[b]))
        || !bf16_gemm_accumulates_in_fp32(Device::Cpu)
    {
        return None;
    }
    let out = Tensor::empty([rows, n], (Kind::Float, Device::Cpu));
    cpu_gemm_bf16_f32(&out, &x.reshape([rows, k]), &weight.tr(), 0.0).then(|| {
        let mut shape = dims;
        *shape.last_mut().unwrap() = n;
        let out = match bias {
            Some(b) => out + b,
            None => out,
        };
        out.to_kind(Kind::BFloat16).view(shape.as_slice())
    })
}

/// The tensor with its BLAS layout, copied to a contiguous one when it has none.
fn layout_or_copy(t: &Tensor) -> (Tensor, (bool, i64)) {
    match blas_layout(t) {
        Some(l) => (t.shallow_clone(), l),
        None => {
            let c = t.contiguous();
            let ld = c.size()[1].max(1);
            (c, (false, ld))
        }
    }
}

/// `acc += a @ b`, `a` and `b` bf16, `acc` fp32, accumulated in fp32 (CUDA: `addmm.dtype_out`;
/// CPU: MKL). False, with `acc` untouched, where the device has no such product; callers
/// should ask [`bf16_gemm_accumulates_in_fp32`] first, which also checks its arithmetic.
pub fn addmm_bf16_into_f32(acc: &Tensor, a: &Tensor, b: &Tensor) -> bool {
    tch::no_grad(|| {
        if acc.device().is_cuda() {
            acc.f_addmm_dtype_out(acc, a, b, Kind::Float).is_ok()
        } else {
            cpu_addmm_bf16_into_f32(acc, a, b)
        }
    })
}

/// Whether `device` adds a product of bf16 matrices into an fp32 one in a single GEMM with
/// fp32 accumulation ([`addmm_bf16_into_f32`]). Checked once per device on a small product
/// against fp32 arithmetic, with a transposed left operand as the fused loss passes it, so a
/// build where the product is absent or behaves otherwise keeps the fp32 GEMM.
pub fn bf16_gemm_accumulates_in_fp32(device: Device) -> bool {
    // The CPU's answer without the lock: every projection of a decoding step asks.
    static CPU: OnceLock<bool> = OnceLock::new();
    if device == Device::Cpu {
        return *CPU.get_or_init(|| check_bf16_gemm(device));
    }
    check_bf16_gemm(device)
}

/// [`bf16_gemm_accumulates_in_fp32`], checked once per device.
fn check_bf16_gemm(device: Device) -> bool {
    static CHECKED: Mutex<Vec<(Device, bool)>> = Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, ok)) = checked.iter().find(|(d, _)| *d == device) {
        return ok;
    }
    let ok = tch::no_grad(|| {
        let values = |n: i64, k: i64, kind: Kind| (Tensor::arange(n * k, (Kind::Float, device)).remainder(7) - 3.0).reshape([n, k]).to_kind(kind) / 4.0;
        let (a, b) = (values(16, 48, Kind::BFloat16).tr(), values(16, 32, Kind::BFloat16));
        let acc = values(48, 32, Kind::Float) + 0.125;
        let want = &acc + a.to_kind(Kind::Float).matmul(&b.to_kind(Kind::Float));
        addmm_bf16_into_f32(&acc, &a, &b) && acc.kind() == Kind::Float && (&acc - &want).abs().max().double_value(&[]) < 1e-3
    });
    checked.push((device, ok));
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: [i64; 2], kind: Kind) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_kind(kind)
    }

    #[test]
    fn the_cpu_product_equals_fp32_arithmetic_for_every_layout() {
        // The pinned x86_64 torch wheel carries MKL; elsewhere (a libtorch without it) the
        // loss keeps its fp32 product and there is nothing to check.
        let available = bf16_gemm_accumulates_in_fp32(Device::Cpu);
        if cfg!(target_arch = "x86_64") {
            assert!(available, "MKL's cblas_gemm_bf16bf16f32 should be in the x86_64 wheel's libtorch_cpu.so");
        } else if !available {
            return;
        }
        // Row-major and transposed operands, odd sizes, a strided (non-contiguous) view.
        let a_rows = random([37, 53], Kind::BFloat16);
        let a_t = random([53, 37], Kind::BFloat16).tr();
        let b_rows = random([53, 29], Kind::BFloat16);
        let b_t = random([29, 53], Kind::BFloat16).tr();
        let b_strided = random([53, 58], Kind::BFloat16).slice(1, 0, 58, 2);
        for (a, b) in [(&a_rows, &b_rows), (&a_t, &b_t), (&a_rows, &b_t), (&a_t, &b_strided)] {
            let acc = random([37, b.size()[1]], Kind::Float);
            let want = &acc + a.to_kind(Kind::Float).matmul(&b.to_kind(Kind::Float));
            assert!(addmm_bf16_into_f32(&acc, a, b));
            let err = (&acc - &want).abs().max().double_value(&[]);
            assert!(err < 1e-4, "largest difference {err}");
        }
    }

    #[test]
    fn a_few_rows_project_as_libtorchs_linear() {
        if !(bf16_gemm_accumulates_in_fp32(Device::Cpu) && cpu_has_bf16_products()) {
            return;
        }
        tch::no_grad(|| {
            let (w, b) = (random([48, 40], Kind::BFloat16), random([1, 48], Kind::BFloat16).view([48]));
            for rows in [1, 7, SMALL_LINEAR_ROWS] {
                let x = random([rows, 40], Kind::BFloat16).view([rows, 1, 40]);
                for bias in [None, Some(&b)] {
                    let got = small_bf16_linear(&x, &w, bias).expect("few rows, no gradient");
                    let want = x.linear(&w, bias);
                    assert_eq!((got.size(), got.kind()), (want.size(), want.kind()));
                    // Both accumulate in fp32 and round once; the order of the sums differs, so
                    // an element may round to the neighbouring bf16 value (2^-7 of it at most).
                    let (got, want) = (got.to_kind(Kind::Float), want.to_kind(Kind::Float));
                    let excess = ((&got - &want).abs() - want.abs() / 128.0).max().double_value(&[]);
                    assert!(excess <= 1e-6, "{rows} rows, bias {}: {excess}", bias.is_some());
                }
            }
            // More rows, fp32, or a weight of the wrong width: libtorch's linear.
            assert!(small_bf16_linear(&random([SMALL_LINEAR_ROWS + 1, 40], Kind::BFloat16), &w, None).is_none());
            assert!(small_bf16_linear(&random([4, 40], Kind::Float), &w.to_kind(Kind::Float), None).is_none());
            assert!(small_bf16_linear(&random([4, 41], Kind::BFloat16), &w, None).is_none());
            assert!(small_bf16_linear(&random([0, 40], Kind::BFloat16), &w, None).is_none(), "no rows");
        });
        // With grad mode on and a weight that wants its gradient, autograd must see the op.
        let w = random([48, 40], Kind::BFloat16).set_requires_grad(true);
        assert!(small_bf16_linear(&random([4, 40], Kind::BFloat16), &w, None).is_none());
        assert!(small_bf16_linear(&random([4, 40], Kind::BFloat16), &w.detach(), None).is_some(), "nothing to record");
    }

    #[test]
    fn mismatched_operands_are_refused_untouched() {
        let acc = Tensor::zeros([4, 5], (Kind::Float, Device::Cpu));
        // fp32 operands, a wrong inner size, a bf16 accumulator: no product, `acc` unchanged.
        assert!(!addmm_bf16_into_f32(&acc, &random([4, 3], Kind::Float), &random([3, 5], Kind::Float)));
        assert!(!addmm_bf16_into_f32(&acc, &random([4, 3], Kind::BFloat16), &random([2, 5], Kind::BFloat16)));
        let acc16 = Tensor::zeros([4, 5], (Kind::BFloat16, Device::Cpu));
        assert!(!addmm_bf16_into_f32(&acc16, &random([4, 3], Kind::BFloat16), &random([3, 5], Kind::BFloat16)));
        assert_eq!(acc.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }
}
