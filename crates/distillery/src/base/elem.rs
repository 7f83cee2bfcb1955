//! The elements of CPU kernels that work on tensor memory directly: fp32 and bf16, read as
//! fp32 and written from fp32 with libtorch's rounding, branch-free so that loops over them
//! vectorise.
use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

/// An element read as fp32: fp32 itself or bf16 (its upper half).
pub trait Element: Copy + Send + Sync {
    /// The tensor dtype whose memory holds elements of this type.
    const KIND: Kind;
    fn f32(self) -> f32;
}

impl Element for f32 {
    const KIND: Kind = Kind::Float;
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

/// A bf16 value's bits (libtorch's `BFloat16` in memory).
#[derive(Clone, Copy, Default, Debug, PartialEq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Element for Bf16 {
    const KIND: Kind = Kind::BFloat16;
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
}

/// A CPU tensor's `len` elements as a slice of `E`, checked: on the CPU, of `E`'s dtype,
/// contiguous, `len` elements.
pub fn elements<E: Element>(t: &Tensor, len: usize) -> Result<&[E]> {
    ensure!(
        t.device() == Device::Cpu && t.kind() == E::KIND && t.is_contiguous() && t.numel() == len,
        "a {:?} tensor of {len} elements, contiguous on the CPU, was expected, got {:?} {:?} {:?}",
        E::KIND,
        t.kind(),
        t.device(),
        t.size()
    );
    // SAFETY: a contiguous CPU tensor of `len` elements of `E::KIND`, whose size and alignment
    // `E` matches (f32 for Float, a u16 wrapper for BFloat16); it outlives the borrow of `t`.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const E, len) })
}

/// An element written from fp32.
pub trait Output: Copy + Send + Sync {
    fn from_f32(x: f32) -> Self;
}

impl Output for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        x
    }
}

impl Output for Bf16 {
    /// Round to nearest, ties to even, as libtorch's cast; NaN to the quiet NaN `0x7FC0` (its
    /// scalar cast's; its vectorised one gives `0xFFFF`, a NaN too).
    #[inline(always)]
    fn from_f32(x: f32) -> Bf16 {
        let b = x.to_bits();
        let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
        Bf16(if x.is_nan() { 0x7FC0 } else { rounded })
    }
}

/// `x` rounded to `E`'s precision and read back: the value a libtorch operator computing in
/// fp32 leaves in a tensor of `E`, as the next operator reads it.
#[inline(always)]
pub fn rounded<E: Element + Output>(x: f32) -> f32 {
    E::from_f32(x).f32()
}

/// `e^x` to about 1 ulp in fp32, branch-free so that loops over it vectorise: Cody-Waite
/// reduction to `x = n ln2 + r`, `|r| <= ln2/2`, Cephes' degree-7 polynomial for `e^r`, and
/// `2^n` put straight into the exponent bits. Below -87.3 (where `e^x` leaves fp32's normal
/// range) it is 0, as libtorch's is to within its subnormals.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer that then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.3);
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.5) * r * r) + r + 1.0;
    let two_n = f32::from_bits(((shifted.to_bits() as i32 - 0x4B40_0000 + 127) << 23) as u32);
    if x < -87.3 {
        0.0
    } else {
        p * two_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_libtorchs() {
        let x = Tensor::randn([4096], (Kind::Float, Device::Cpu)) * 100.0;
        let specials = Tensor::from_slice(&[f32::NAN, -f32::NAN, f32::from_bits(0x7F80_0001), f32::INFINITY, -0.0, f32::MAX]);
        let x = Tensor::cat(&[x, specials], 0);
        let want = x.to_kind(Kind::BFloat16);
        let xs = Vec::<f32>::try_from(&x).unwrap();
        let got: Vec<u16> = xs.iter().map(|&v| Bf16::from_f32(v).0).collect();
        let want_bits = Vec::<i16>::try_from(&want.view_dtype(Kind::Int16)).unwrap();
        for ((g, w), v) in got.iter().zip(&want_bits).zip(&xs) {
            // Any NaN is libtorch's NaN; every other value has its exact bits.
            let nan = |bits: u16| bits & 0x7F80 == 0x7F80 && bits & 0x7F != 0;
            assert!(*g == *w as u16 || (v.is_nan() && nan(*g) && nan(*w as u16)), "{v}: {g:#x} against {:#x}", *w as u16);
        }
    }
}
