//! Bit-exact reproduction of CPU `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`.
//!
//! diffusers draws the initial latents with a CPU generator and then moves them to the device
//! (spec §3.2), so "seed N" means exactly the numbers torch's CPU generator produces. This module
//! ports torch's algorithm (spec §3.3, `reference/refcheck/TORCH_RANDN.md`):
//!
//! * bits: MT19937 seeded with the seed's **low 32 bits** (`init_genrand`);
//! * uniforms: `(r & 0xFFFFFF) * 2^-24` (f32, one 32-bit draw each);
//! * normals (numel ≥ 16): torch's AVX2 Box–Muller kernel on blocks of 16 (element `j` paired
//!   with `j + 8`) using the Cephes polynomials of `avx_mathfun.h` with the FMA contractions GCC
//!   applied. This is the kernel torch runs on every AVX2 / AVX-512 x86 CPU (the goldens were made
//!   with it). It is plain f32 arithmetic, reproduced here with `f32::mul_add` (a true
//!   single-rounding FMA on every platform), so the result does not depend on the CPU running
//!   this code;
//! * numel < 16: torch's scalar double-precision Box–Muller with a cached second value.
//!
//! bf16 (torch 2.15 behaviour, spec §3.3): the same f32 numbers rounded to nearest-even; the only
//! difference from `RNE(randn f32)` is the tail block when `numel % 16 != 0` (the reduced
//! precision path draws its uniforms block by block, TORCH_RANDN.md §4b). The legacy torch ≤ 2.11
//! native-bf16 path is available as [`Bf16Noise::LegacyNative`].
//!
//! The numbers are produced on the CPU (as torch does) and then moved to the target device.
// The Cephes constants below are copied digit for digit from avx_mathfun.h (see above).
#![allow(clippy::excessive_precision, clippy::approx_constant)]

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

const MT_N: usize = 624;
const MT_M: usize = 397;

/// The standard 32-bit Mersenne Twister (`std::mt19937`, torch's `at::mt19937`).
#[derive(Clone)]
pub struct Mt19937 {
    mt: [u32; MT_N],
    idx: usize,
}

impl Mt19937 {
    /// `init_genrand(seed)`.
    pub fn new(seed: u32) -> Self {
        let mut mt = [0u32; MT_N];
        mt[0] = seed;
        for i in 1..MT_N {
            let prev = mt[i - 1];
            mt[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { mt, idx: MT_N }
    }

    fn twist(&mut self) {
        let mt = &mut self.mt;
        for i in 0..MT_N {
            let y = (mt[i] & 0x8000_0000) | (mt[(i + 1) % MT_N] & 0x7fff_ffff);
            let mut v = mt[(i + MT_M) % MT_N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            mt[i] = v;
        }
        self.idx = 0;
    }

    /// One tempered 32-bit output.
    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.idx >= MT_N {
            self.twist();
        }
        let mut y = self.mt[self.idx];
        self.idx += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// torch's `random64()`: two draws, the first one is the **high** word.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }
}

/// `uniform_real_distribution<float>(0,1)`: low 24 bits × 2^-24, exact in f32.
#[inline(always)]
fn uniform_f32(r: u32) -> f32 {
    (r & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
}

/// `uniform_real_distribution<double>(0,1)`: low 53 bits of `random64()` × 2^-53.
#[inline(always)]
fn uniform_f64(r: u64) -> f64 {
    (r & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
}

// Cephes / avx_mathfun.h constants, all f32 (spec §3.3), written exactly as in the C source so
// they can be checked against it; rustc rounds them to the same f32 values.
const LOG_P: [f32; 9] = [
    7.037_683_6e-2,
    -1.151_461_031_0e-1,
    1.167_699_874_0e-1,
    -1.242_014_084_6e-1,
    1.424_932_278_7e-1,
    -1.666_805_766_5e-1,
    2.000_071_476_5e-1,
    -2.499_999_399_3e-1,
    3.333_333_117_4e-1,
];
const LOG_Q1: f32 = -2.121_944_40e-4;
const LOG_Q2: f32 = 0.693_359_375;
const SQRTHF: f32 = 0.707_106_781_186_547_524;
const MIN_NORM_POS: f32 = 1.175_494_35e-38;
const DP1: f32 = -0.785_156_25;
const DP2: f32 = -2.418_756_484_985_351_562_5e-4;
const DP3: f32 = -3.774_894_977_445_941_08e-8;
const SIN_P: [f32; 3] = [-1.951_529_589_1e-4, 8.332_160_873_6e-3, -1.666_665_461_1e-1];
const COS_P: [f32; 3] = [
    2.443_315_711_809_948e-5,
    -1.388_731_625_493_765e-3,
    4.166_664_568_298_827e-2,
];
const FOPI: f32 = 1.273_239_544_735_16;
const TWO_PI_F32: f32 = std::f32::consts::TAU;

/// `log256_ps` lane function as compiled into torch's AVX2 kernel (every `a*b+c` fused).
#[inline(always)]
fn log_avx2(x: f32) -> f32 {
    let x = x.max(MIN_NORM_POS);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32;
    e += 1.0;
    let m = f32::from_bits((bits & 0x807f_ffff) | 0x3f00_0000);
    let mask = m < SQRTHF;
    let mut x = (m - 1.0) + if mask { m } else { 0.0 };
    e -= if mask { 1.0 } else { 0.0 };
    let z = x * x;
    let mut y = LOG_P[0];
    for &p in &LOG_P[1..] {
        y = y.mul_add(x, p);
    }
    y *= x;
    y = y.mul_add(z, e * LOG_Q1);
    y = (-z).mul_add(0.5, y);
    x += y;
    e.mul_add(LOG_Q2, x)
}

/// `sincos256_ps` lane function (input ≥ 0), with GCC's FMA contractions. Returns (sin, cos).
#[inline(always)]
fn sincos_avx2(x: f32) -> (f32, f32) {
    let j = (x * FOPI) as i32; // cvttps: truncation (x < 2π so always in range)
    let j = (j + 1) & !1;
    let y = j as f32;
    let sin_neg = j & 4 != 0;
    let cos_neg = (j - 2) & 4 == 0;
    let poly = j & 2 == 0;
    let mut x = y.mul_add(DP1, x);
    x = y.mul_add(DP2, x);
    x = y.mul_add(DP3, x);
    let z = x * x;
    let mut yc = COS_P[0].mul_add(z, COS_P[1]).mul_add(z, COS_P[2]);
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;
    let mut ys = SIN_P[0].mul_add(z, SIN_P[1]).mul_add(z, SIN_P[2]);
    ys *= z;
    ys = ys.mul_add(x, x);
    let (s, c) = if poly { (ys, yc) } else { (yc, ys) };
    (if sin_neg { -s } else { s }, if cos_neg { -c } else { c })
}

/// `normal_fill_16_AVX2` with mean 0, std 1, in place on 16 uniforms.
#[inline(always)]
fn box_muller16(b: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - b[j];
        let radius = (-2.0 * log_avx2(u1)).sqrt();
        let theta = TWO_PI_F32 * b[j + 8];
        let (s, c) = sincos_avx2(theta);
        // torch stores fma(n, std=1, mean=0): the identity except that -0.0 becomes +0.0.
        b[j] = radius * c + 0.0;
        b[j + 8] = radius * s + 0.0;
    }
}

fn box_muller_blocks_generic(buf: &mut [f32]) {
    for block in buf.chunks_exact_mut(16) {
        box_muller16(block);
    }
}

/// Same code compiled with hardware FMA so that `mul_add` is one instruction (and the loop can
/// be vectorised); the results are identical to the generic version, only faster.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn box_muller_blocks_fma(buf: &mut [f32]) {
    for block in buf.chunks_exact_mut(16) {
        box_muller16(block);
    }
}

/// Transforms every complete block of 16 uniforms in `buf` into normals.
fn box_muller_blocks(buf: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            unsafe { box_muller_blocks_fma(buf) };
            return;
        }
    }
    box_muller_blocks_generic(buf)
}

/// Which algorithm produces bf16 noise (spec §3.3: it changed between torch versions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bf16Noise {
    /// torch ≥ 2.15 (the reference harness): the f32 kernel, rounded to nearest-even.
    #[default]
    RoundedF32,
    /// torch ≤ 2.11: Box–Muller natively in bf16 with 8-bit uniforms (values within ±3.33).
    LegacyNative,
}

/// State-carrying equivalent of `torch.Generator("cpu").manual_seed(seed)` for `randn` calls.
#[derive(Clone)]
pub struct TorchGenerator {
    mt: Mt19937,
    /// torch's `next_double_normal_sample` (second Box–Muller value of the scalar path).
    cached_normal: Option<f64>,
}

impl TorchGenerator {
    /// `manual_seed(seed)`: only the low 32 bits are used (spec §3.3).
    pub fn new(seed: u64) -> Self {
        Self {
            mt: Mt19937::new(seed as u32),
            cached_normal: None,
        }
    }

    /// numel < 16: one double Box–Muller per two elements (`r` from u2, `theta` from u1), the
    /// sine cached for the next element (TORCH_RANDN.md §5).
    fn small(&mut self, n: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            if let Some(v) = self.cached_normal.take() {
                out.push(v);
                continue;
            }
            let u1 = uniform_f64(self.mt.next_u64());
            let u2 = uniform_f64(self.mt.next_u64());
            let r = (-2.0 * (-u2).ln_1p()).sqrt();
            let theta = 2.0 * std::f64::consts::PI * u1;
            self.cached_normal = Some(r * theta.sin());
            out.push(r * theta.cos());
        }
        out
    }

    /// `torch.randn(n, dtype=float32)`: all `n` uniforms first, complete blocks in place, then
    /// (if `n % 16 != 0`) 16 fresh uniforms re-done as one block over the last 16 slots.
    pub fn randn_f32(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return self.small(n).into_iter().map(|v| v as f32).collect();
        }
        let mut buf: Vec<f32> = (0..n).map(|_| uniform_f32(self.mt.next_u32())).collect();
        let full = n / 16 * 16;
        box_muller_blocks(&mut buf[..full]);
        if !n.is_multiple_of(16) {
            let tail = &mut buf[n - 16..];
            for v in tail.iter_mut() {
                *v = uniform_f32(self.mt.next_u32());
            }
            box_muller_blocks(tail);
        }
        buf
    }

    /// The f32 values whose RNE rounding torch 2.15 returns for `randn(n, dtype=bfloat16)`
    /// (also float16): uniforms are drawn block by block, so the tail block (n % 16 != 0) uses
    /// the draws right after the complete blocks (TORCH_RANDN.md §4b).
    fn randn_reduced_f32(&mut self, n: usize) -> Vec<f32> {
        if n < 16 || n.is_multiple_of(16) {
            return self.randn_f32(n);
        }
        let full = n / 16 * 16;
        let mut buf: Vec<f32> = (0..full).map(|_| uniform_f32(self.mt.next_u32())).collect();
        buf.resize(n, 0.0);
        box_muller_blocks(&mut buf[..full]);
        let tail = &mut buf[n - 16..];
        for v in tail.iter_mut() {
            *v = uniform_f32(self.mt.next_u32());
        }
        box_muller_blocks(tail);
        buf
    }

    /// `torch.randn(n, dtype=bfloat16)` (torch 2.15): RNE of the reduced-precision f32 values.
    pub fn randn_bf16(&mut self, n: usize) -> Vec<half::bf16> {
        self.randn_reduced_f32(n)
            .into_iter()
            .map(half::bf16::from_f32)
            .collect()
    }

    /// `torch.randn(n, dtype=float16)` (torch 2.15).
    pub fn randn_f16(&mut self, n: usize) -> Vec<half::f16> {
        self.randn_reduced_f32(n)
            .into_iter()
            .map(half::f16::from_f32)
            .collect()
    }

    /// `torch.randn(n, dtype=bfloat16)` as torch ≤ 2.11 computed it (spec §3.3): everything in
    /// bf16 with 8-bit uniforms and glibc `logf`/`sinf`/`cosf` (what Rust's `f32::ln/sin/cos`
    /// call on Linux), each op in f32 then rounded to bf16.
    pub fn randn_bf16_legacy(&mut self, n: usize) -> Vec<half::bf16> {
        use half::bf16;
        if n < 16 {
            return self
                .small(n)
                .into_iter()
                .map(|v| bf16::from_f32(v as f32))
                .collect();
        }
        let r = |v: f32| bf16::from_f32(v).to_f32();
        let draw = |mt: &mut Mt19937| r((mt.next_u32() & 0xff) as f32 / 256.0);
        let block = |b: &mut [f32]| {
            for j in 0..8 {
                let u1 = r(1.0 - b[j]);
                let radius = r(r(-2.0 * r(u1.ln())).sqrt());
                let theta = r((2.0 * std::f64::consts::PI * b[j + 8] as f64) as f32);
                b[j] = r(radius * r(theta.cos()));
                b[j + 8] = r(radius * r(theta.sin()));
            }
        };
        let mut buf: Vec<f32> = (0..n).map(|_| draw(&mut self.mt)).collect();
        let full = n / 16 * 16;
        buf[..full].chunks_exact_mut(16).for_each(block);
        if !n.is_multiple_of(16) {
            let tail = &mut buf[n - 16..];
            for v in tail.iter_mut() {
                *v = draw(&mut self.mt);
            }
            block(tail);
        }
        buf.into_iter().map(bf16::from_f32).collect()
    }
}

/// `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` in f32, flattened
/// row-major. Bit-exact (AVX2 kernel, see the module docs).
pub fn torch_randn(seed: u64, shape: &[usize]) -> Vec<f32> {
    TorchGenerator::new(seed).randn_f32(shape.iter().product())
}

/// `torch.randn(shape, generator=..manual_seed(seed), dtype)` as a tensor on `device`
/// (drawn on the CPU like diffusers' `randn_tensor` with a CPU generator, then moved).
/// Supported dtypes: F32, BF16 (torch 2.15 rule), F16.
pub fn randn_tensor(seed: u64, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    randn_tensor_with(seed, shape, dtype, Bf16Noise::RoundedF32, device)
}

/// [`randn_tensor`] with an explicit choice of the bf16 algorithm.
pub fn randn_tensor_with(
    seed: u64,
    shape: &[usize],
    dtype: DType,
    bf16_mode: Bf16Noise,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut g = TorchGenerator::new(seed);
    let t = match (dtype, bf16_mode) {
        (DType::F32, _) => Tensor::from_vec(g.randn_f32(n), shape, &Device::Cpu),
        (DType::BF16, Bf16Noise::RoundedF32) => {
            Tensor::from_vec(g.randn_bf16(n), shape, &Device::Cpu)
        }
        (DType::BF16, Bf16Noise::LegacyNative) => {
            Tensor::from_vec(g.randn_bf16_legacy(n), shape, &Device::Cpu)
        }
        (DType::F16, _) => Tensor::from_vec(g.randn_f16(n), shape, &Device::Cpu),
        (other, _) => {
            bail!("randn_tensor: dtype {other:?} is not supported for noise (use F32, BF16 or F16)")
        }
    }
    .with_context(|| format!("randn_tensor: building a {shape:?} tensor"))?;
    t.to_device(device)
        .with_context(|| format!("randn_tensor: moving the {shape:?} noise to {device:?}"))
}

/// diffusers' `randn_tensor` with a **list** of CPU generators (spec §3.2): sample `b` is
/// `randn((1, ...rest), generator=seeds[b])`, concatenated on dim 0. `shape[0]` must equal
/// `seeds.len()`.
pub fn randn_tensor_per_sample(
    seeds: &[u64],
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    if shape.first() != Some(&seeds.len()) {
        bail!(
            "randn_tensor_per_sample: {} seeds for a batch of {:?} (one seed per sample)",
            seeds.len(),
            shape.first()
        );
    }
    let mut one = shape.to_vec();
    one[0] = 1;
    let parts = seeds
        .iter()
        .map(|&s| randn_tensor(s, &one, dtype, device))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_reference_output() {
        // The 10000th output of std::mt19937 with the default seed 5489 (C++ standard).
        let mut mt = Mt19937::new(5489);
        let mut v = 0;
        for _ in 0..10000 {
            v = mt.next_u32();
        }
        assert_eq!(v, 4_123_659_995);
    }

    #[test]
    fn fma_and_generic_kernels_agree() {
        let mut g = TorchGenerator::new(3);
        let mut a: Vec<f32> = (0..4096).map(|_| uniform_f32(g.mt.next_u32())).collect();
        let mut b = a.clone();
        box_muller_blocks_generic(&mut a);
        box_muller_blocks(&mut b);
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
