//! MKL's vector square root as libtorch's CPU `sqrt` calls it, for kernels that must round as
//! libtorch's operators do. libtorch 2.11 computes an fp32 `sqrt` through MKL VML
//! (`vmsSqrt`, high-accuracy mode, `VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE`), which is
//! not always the correctly rounded root (`f32::sqrt`): 2 of 200k AdamW updates differed by one
//! ulp. The function is looked up in the process at run time (the torch wheel's
//! `libtorch_cpu.so` exports it); without it, callers keep libtorch's operator.
use std::ffi::c_int;
use std::sync::OnceLock;

/// `vmsSqrt(n, a, r, mode)` (MKL, LP64: a 32-bit count, a 64-bit mode).
type VmsSqrt = unsafe extern "C" fn(n: c_int, a: *const f32, r: *mut f32, mode: i64);

/// ATen's mode for every VML call (`ATen/cpu/vml.h`): high accuracy, denormals kept, errors
/// ignored.
const ATEN_MODE: i64 = 0x2 | 0x14_0000 | 0x100;

fn vms_sqrt() -> Option<VmsSqrt> {
    static FOUND: OnceLock<Option<VmsSqrt>> = OnceLock::new();
    *FOUND.get_or_init(|| {
        // SAFETY: dlsym over the process's global symbols with a valid C string; a non-null
        // result is MKL's vmsSqrt, of the type above.
        let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"vmsSqrt".as_ptr()) };
        (!f.is_null()).then(|| unsafe { std::mem::transmute::<*mut libc::c_void, VmsSqrt>(f) })
    })
}

/// Whether [`sqrt`] can run here.
pub fn sqrt_available() -> bool {
    vms_sqrt().is_some()
}

/// `out[i] = sqrt(input[i])` exactly as libtorch's fp32 CPU `sqrt`; false, with nothing
/// written, when MKL's routine is absent or the lengths differ or exceed a 32-bit count.
pub fn sqrt(input: &[f32], out: &mut [f32]) -> bool {
    let Some(f) = vms_sqrt() else { return false };
    let Ok(n) = c_int::try_from(input.len()) else {
        return false;
    };
    if out.len() != input.len() {
        return false;
    }
    // SAFETY: `input` and `out` hold `n` elements each; MKL reads the one and writes the other.
    unsafe { f(n, input.as_ptr(), out.as_mut_ptr(), ATEN_MODE) };
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn equals_libtorchs_sqrt_bit_for_bit() {
        if !sqrt_available() {
            eprintln!("no MKL VML in this libtorch: nothing to compare");
            return;
        }
        // Many magnitudes, denormals, zeros, infinity and NaN, over a length no vector width divides.
        let x = (Tensor::randn([100_003], (Kind::Float, Device::Cpu)) * 40.0).exp();
        let specials = Tensor::from_slice(&[
            0.0f32,
            -0.0,
            1e-40,
            1.4e-45,
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
            -1.0,
        ]);
        let x = Tensor::cat(&[x, specials], 0);
        let want = Vec::<f32>::try_from(&x.sqrt()).unwrap();
        let xs = Vec::<f32>::try_from(&x).unwrap();
        let mut got = vec![0f32; xs.len()];
        // In pieces, as a kernel calls it: where a piece starts must not matter.
        let mut at = 0;
        for len in [1usize, 7, 16, 1000, 33].iter().cycle() {
            if at >= xs.len() {
                break;
            }
            let end = (at + len).min(xs.len());
            assert!(sqrt(&xs[at..end], &mut got[at..end]));
            at = end;
        }
        let differing = got
            .iter()
            .zip(&want)
            .filter(|(g, w)| g.to_bits() != w.to_bits() && !(g.is_nan() && w.is_nan()))
            .count();
        assert_eq!(
            differing,
            0,
            "{differing} of {} roots differ from libtorch's",
            xs.len()
        );
        let correctly_rounded = xs
            .iter()
            .zip(&want)
            .filter(|(x, w)| x.sqrt().to_bits() != w.to_bits() && !w.is_nan())
            .count();
        eprintln!(
            "libtorch's sqrt differs from the correctly rounded root in {correctly_rounded} of {}",
            xs.len()
        );
    }
}
