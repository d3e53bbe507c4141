//! The two 8-bit float formats of fp8 checkpoints, bit-exact with torch's
//! `float8_e4m3fn` / `float8_e5m2`, and the per-tensor scale arithmetic of BFL's and ComfyUI's
//! files (spec-wave2 §2.2): `scale = amax / max`, `q = fp8(w / scale)`, `w ≈ f32(q) · scale`.
//!
//! Decoding is a 256-entry table. Encoding rounds to nearest, ties to even (torch's rule) and
//! saturates at ±max. torch 2.15's `float8_e4m3fn` cast saturates too (infinities included);
//! its `float8_e5m2` cast overflows to ±inf from 61440 up. ComfyUI and BFL clamp to ±max
//! before the cast, so quantised files are the same either way.

use std::sync::OnceLock;

use rayon::prelude::*;

/// An fp8 storage format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    /// `float8_e4m3fn` (safetensors `F8_E4M3`): 4 exponent bits (bias 7), 3 mantissa bits, no
    /// infinities, largest finite 448. What BFL's files use.
    E4M3,
    /// `float8_e5m2` (safetensors `F8_E5M2`): 5 exponent bits (bias 15), 2 mantissa bits,
    /// IEEE-style infinities and NaNs, largest finite 57344: the upper byte of an f16.
    E5M2,
}

impl Fp8Format {
    /// The name in `_quantization_metadata` / `comfy_quant` (`"float8_e4m3fn"`,
    /// `"float8_e5m2"`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "float8_e4m3fn" | "float8_e4m3" | "fp8_e4m3fn" | "f8_e4m3" => Some(Self::E4M3),
            "float8_e5m2" | "fp8_e5m2" | "f8_e5m2" => Some(Self::E5M2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::E4M3 => "float8_e4m3fn",
            Self::E5M2 => "float8_e5m2",
        }
    }

    /// The largest finite value.
    pub fn max(self) -> f32 {
        match self {
            Self::E4M3 => 448.0,
            Self::E5M2 => 57344.0,
        }
    }

    fn mantissa_bits(self) -> u32 {
        match self {
            Self::E4M3 => 3,
            Self::E5M2 => 2,
        }
    }

    fn bias(self) -> i32 {
        match self {
            Self::E4M3 => 7,
            Self::E5M2 => 15,
        }
    }

    /// The code of the largest finite positive value (448 = 0x7E, 57344 = 0x7B).
    fn max_code(self) -> u8 {
        match self {
            Self::E4M3 => 0x7E,
            Self::E5M2 => 0x7B,
        }
    }

    fn nan_code(self) -> u8 {
        match self {
            Self::E4M3 => 0x7F,
            Self::E5M2 => 0x7E,
        }
    }

    /// The value of one code.
    pub fn decode(self, code: u8) -> f32 {
        self.table()[code as usize]
    }

    /// The table of all 256 values.
    pub fn table(self) -> &'static [f32; 256] {
        static E4M3: OnceLock<[f32; 256]> = OnceLock::new();
        static E5M2: OnceLock<[f32; 256]> = OnceLock::new();
        let cell = match self {
            Self::E4M3 => &E4M3,
            Self::E5M2 => &E5M2,
        };
        cell.get_or_init(|| std::array::from_fn(|c| self.decode_bits(c as u8)))
    }

    fn decode_bits(self, code: u8) -> f32 {
        match self {
            // The upper byte of an f16.
            Self::E5M2 => half::f16::from_bits((code as u16) << 8).to_f32(),
            Self::E4M3 => {
                let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
                let exp = ((code >> 3) & 0xF) as i32;
                let man = (code & 0x7) as f32;
                if exp == 0xF && man == 7.0 {
                    f32::NAN
                } else if exp == 0 {
                    sign * man / 8.0 * 2f32.powi(-6)
                } else {
                    sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
                }
            }
        }
    }

    /// The code nearest to `x` (ties to even), ±max for larger magnitudes (infinities
    /// included), NaN for NaN.
    pub fn encode(self, x: f32) -> u8 {
        if x.is_nan() {
            return self.nan_code();
        }
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = x.abs();
        let man_bits = self.mantissa_bits();
        let bias = self.bias();
        let min_normal = 2f32.powi(1 - bias);
        let code = if a < min_normal {
            // Subnormal: a multiple of the smallest step 2^(1 - bias - man_bits); scaling by a
            // power of two is exact, so one rounding.
            (a * 2f32.powi(bias - 1 + man_bits as i32)).round_ties_even() as u32
        } else {
            // Round the f32 mantissa to `man_bits` bits, ties to even; a carry moves into the
            // exponent, as it should.
            let u = a.to_bits().min(0x7F80_0000);
            let shift = 23 - man_bits;
            let rounded = (u + ((1 << (shift - 1)) - 1) + ((u >> shift) & 1)) >> shift;
            rounded - (((127 - bias) as u32) << man_bits)
        };
        sign | code.min(self.max_code() as u32) as u8
    }
}

/// The per-tensor weight scale of BFL's and ComfyUI's files: `amax / max` in f32, so the
/// largest magnitude maps to the format's largest value. An all-zero tensor gets scale 1 (any
/// scale represents it; amax/max = 0 would divide by zero).
pub fn per_tensor_scale(values: &[f32], format: Fp8Format) -> f32 {
    let amax = values
        .par_iter()
        .fold(|| 0f32, |m, v| m.max(v.abs()))
        .reduce(|| 0f32, f32::max);
    if amax > 0.0 && amax.is_finite() {
        amax / format.max()
    } else {
        1.0
    }
}

/// `q = fp8(w / scale)` for every value (f32 division, then one rounding).
pub fn quantize(values: &[f32], scale: f32, format: Fp8Format) -> Vec<u8> {
    values
        .par_iter()
        .map(|&v| format.encode(v / scale))
        .collect()
}

/// `w = f32(q) · scale` for every code (one f32 multiplication, as torch's
/// `q.to(float32) * scale`).
pub fn dequantize(codes: &[u8], scale: f32, format: Fp8Format) -> Vec<f32> {
    let table = format.table();
    codes
        .par_iter()
        .map(|&c| table[c as usize] * scale)
        .collect()
}

/// [`dequantize`] with one scale per row of `row_len` values (per-output-channel scales).
pub fn dequantize_rows(
    codes: &[u8],
    scales: &[f32],
    row_len: usize,
    format: Fp8Format,
) -> Vec<f32> {
    let table = format.table();
    let mut out = vec![0f32; codes.len()];
    out.par_chunks_mut(row_len.max(1))
        .zip(codes.par_chunks(row_len.max(1)))
        .zip(scales.par_iter())
        .for_each(|((o, c), &s)| {
            for (o, &c) in o.iter_mut().zip(c) {
                *o = table[c as usize] * s;
            }
        });
    out
}

/// What `--quantize fp8` does to one weight on devices that compute with dequantized weights:
/// per-tensor E4M3 quantization (`scale = amax/448`, as BFL's files) and back, so the values
/// are those an fp8 file made the same way would hold.
pub fn round_trip(values: &[f32], format: Fp8Format) -> Vec<f32> {
    let scale = per_tensor_scale(values, format);
    dequantize(&quantize(values, scale, format), scale, format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_known_values() {
        let f = Fp8Format::E4M3;
        assert_eq!(f.decode(0x7E), 448.0);
        assert_eq!(f.decode(0xFE), -448.0);
        assert!(f.decode(0x7F).is_nan() && f.decode(0xFF).is_nan());
        assert_eq!(f.decode(0x01), 2f32.powi(-9));
        assert_eq!(f.decode(0x08), 2f32.powi(-6));
        assert_eq!(f.decode(0x38), 1.0);
        let g = Fp8Format::E5M2;
        assert_eq!(g.decode(0x7B), 57344.0);
        assert_eq!(g.decode(0x7C), f32::INFINITY);
        assert!(g.decode(0x7E).is_nan());
        assert_eq!(g.decode(0x01), 2f32.powi(-16));
        assert_eq!(g.decode(0x3C), 1.0);
    }

    /// Every finite code encodes back to itself; midpoints round to the even neighbour;
    /// values beyond the range saturate.
    #[test]
    fn encode_is_the_inverse_and_rounds_to_even() {
        for f in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let mut finite: Vec<(f32, u8)> = (0..=255u8)
                .map(|c| (f.decode(c), c))
                .filter(|(v, _)| v.is_finite())
                .collect();
            for &(v, c) in &finite {
                let want = if v == 0.0 { c & 0x80 } else { c };
                assert_eq!(f.encode(v), want, "{f:?} code {c:#x} = {v}");
            }
            finite.retain(|(v, _)| *v >= 0.0 && v.to_bits() != 0x8000_0000);
            finite.sort_by(|a, b| a.0.total_cmp(&b.0));
            for w in finite.windows(2) {
                let ((lo, cl), (hi, ch)) = (w[0], w[1]);
                let mid = (lo + hi) / 2.0;
                let even = if cl % 2 == 0 { cl } else { ch };
                assert_eq!(f.encode(mid), even, "{f:?} midpoint of {lo} and {hi}");
                assert_eq!(f.encode(mid.next_down()), cl);
                assert_eq!(f.encode(mid.next_up()), ch);
                assert_eq!(f.encode(-mid.next_up()), ch | 0x80);
            }
            assert_eq!(f.encode(f.max() * 2.0), f.max_code());
            assert_eq!(f.encode(f32::NEG_INFINITY), f.max_code() | 0x80);
            assert!(f.decode(f.encode(f32::NAN)).is_nan());
        }
    }

    #[test]
    fn per_tensor_scaling() {
        let w = [0.5f32, -3.0, 1.25, 0.0];
        let f = Fp8Format::E4M3;
        let s = per_tensor_scale(&w, f);
        assert_eq!(s, 3.0 / 448.0);
        let q = quantize(&w, s, f);
        // The largest magnitude lands on the largest code, exactly.
        assert_eq!(q[1], 0xFE);
        assert_eq!(dequantize(&q, s, f)[1], -448.0 * s);
        let back = round_trip(&w, f);
        for (a, b) in w.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() / 16.0, "{a} vs {b}");
        }
        assert_eq!(per_tensor_scale(&[0.0, 0.0], f), 1.0);
        let rows = dequantize_rows(&[0x38, 0x38, 0x40, 0x40], &[2.0, 0.5], 2, f);
        assert_eq!(rows, vec![2.0, 2.0, 1.0, 1.0]);
    }
}
