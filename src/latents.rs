//! Latent layout helpers: token packing, 2×2 patchify, VAE batch-norm (de)normalisation and the
//! 4-axis position ids (spec §3.4, §4 steps 6-8, §6.3, §6.4).
//!
//! Shapes: `[B, C, h, w]` is the patchified latent grid (C = 4 × VAE latent channels, 128 for
//! klein), `[B, h·w, C]` the packed token sequence (token `y*w + x`, channel k = grid channel k).
//! All functions are tensor ops (CPU or CUDA).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// `_pack_latents`: `[B,C,h,w] → reshape [B,C,h·w] → transpose → [B,h·w,C]` (spec §3.4).
pub fn pack(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4().context("pack: expected a [B, C, h, w] latent")?;
    Ok(x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?)
}

/// Inverse of [`pack`]: `[B,h·w,C] → [B,C,h,w]`.
///
/// diffusers' `_unpack_latents_with_ids` scatters token `i` to `(ids[i,1], ids[i,2])`; the
/// target ids are always `(0, y, x, 0)` in row-major order (see [`image_ids`]), so the scatter
/// is exactly this reshape/transpose.
pub fn unpack(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, n, c) = x
        .dims3()
        .context("unpack: expected a [B, N, C] token tensor")?;
    if n != h * w {
        bail!("unpack: {n} tokens do not form a {h}×{w} grid");
    }
    Ok(x.transpose(1, 2)?.reshape((b, c, h, w))?)
}

/// `_patchify_latents` (spec §6.3): `[B,c,H,W] → [B,4c,H/2,W/2]`, output channel
/// `4c + 2dy + dx` at `(y, x)` = input channel `c` at `(2y+dy, 2x+dx)`.
pub fn patchify(x: &Tensor) -> Result<Tensor> {
    let (b, c, hh, ww) = x
        .dims4()
        .context("patchify: expected a [B, c, H, W] latent")?;
    if hh % 2 != 0 || ww % 2 != 0 {
        bail!("patchify: latent size {hh}×{ww} must be even");
    }
    Ok(x.reshape((b, c, hh / 2, 2, ww / 2, 2))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * 4, hh / 2, ww / 2))?)
}

/// `_unpatchify_latents`: the exact inverse of [`patchify`], `[B,4c,h,w] → [B,c,2h,2w]`.
pub fn unpatchify(x: &Tensor) -> Result<Tensor> {
    let (b, c4, h, w) = x
        .dims4()
        .context("unpatchify: expected a [B, 4c, h, w] latent")?;
    if c4 % 4 != 0 {
        bail!("unpatchify: channel count {c4} is not a multiple of 4");
    }
    Ok(x.reshape((b, c4 / 4, 2, 2, h, w))?
        .permute((0, 1, 4, 2, 5, 3))?
        .reshape((b, c4 / 4, h * 2, w * 2))?)
}

/// Runs `f` on f32 values and rounds the result to `dtype`: torch evaluates every bf16/f16
/// elementwise op in f32 and rounds once (spec §1), on CPU and CUDA alike. Doing the same
/// explicitly keeps the bits independent of candle's per-backend half-precision kernels.
fn op_in(dtype: DType, f: impl FnOnce() -> candle_core::Result<Tensor>) -> Result<Tensor> {
    Ok(f()?.to_dtype(dtype)?)
}

/// The VAE batch-norm statistics as the pipeline uses them: `mean` and `std`, both `[1, C, 1, 1]`
/// in the latent dtype. Build once per call with [`BnStats::new`] and apply with
/// [`BnStats::normalize`] (reference images) / [`BnStats::denormalize`] (before decoding).
#[derive(Debug, Clone)]
pub struct BnStats {
    pub mean: Tensor,
    pub std: Tensor,
}

impl BnStats {
    /// `mean = running_mean.to(dtype)`, `std = sqrt(running_var + eps).to(dtype)` where the add
    /// and the sqrt are evaluated in the **buffer** dtype (spec §1, §6.4): with bf16 buffers
    /// both round to bf16. torch rounds the python scalar `eps` to the buffer dtype before a
    /// bf16 `add` (checked on torch 2.15: `bf16_tensor + s` uses `bf16(s)`), so we do too.
    ///
    /// The sqrt is correctly rounded (as on CUDA). torch's CPU f32 `sqrt` is not (about 17 % of
    /// inputs come out 1 ulp off), so f32 CPU goldens can differ by 1 ulp in `std`; bf16 results
    /// agree for every bf16 input.
    pub fn new(
        running_mean: &Tensor,
        running_var: &Tensor,
        eps: f64,
        dtype: DType,
    ) -> Result<Self> {
        let c = running_mean.elem_count();
        if running_mean.rank() != 1 || running_var.dims() != running_mean.dims() {
            bail!(
                "bn stats: running_mean {:?} and running_var {:?} must be equal 1-D shapes",
                running_mean.dims(),
                running_var.dims()
            );
        }
        let buf_dtype = running_var.dtype();
        let device = running_var.device();
        let eps_t = Tensor::new(eps as f32, device)?
            .to_dtype(buf_dtype)?
            .to_dtype(DType::F32)?;
        let var = running_var.to_dtype(DType::F32)?;
        let var_eps = op_in(buf_dtype, || var.broadcast_add(&eps_t))?;
        let std = op_in(buf_dtype, || var_eps.to_dtype(DType::F32)?.sqrt())?;
        let std = std.to_dtype(dtype)?.reshape((1, c, 1, 1))?;
        let mean = running_mean.to_dtype(dtype)?.reshape((1, c, 1, 1))?;
        Ok(Self { mean, std })
    }

    /// Statistics given directly (`[1, C, 1, 1]` or `[C]`, cast to `dtype`).
    pub fn from_parts(mean: &Tensor, std: &Tensor, dtype: DType) -> Result<Self> {
        let c = mean.elem_count();
        if std.elem_count() != c {
            bail!("bn stats: mean has {c} values, std {}", std.elem_count());
        }
        Ok(Self {
            mean: mean.to_dtype(dtype)?.reshape((1, c, 1, 1))?,
            std: std.to_dtype(dtype)?.reshape((1, c, 1, 1))?,
        })
    }

    fn check(&self, z: &Tensor, what: &str) -> Result<()> {
        let (_, c, _, _) = z
            .dims4()
            .with_context(|| format!("{what}: expected a [B, C, h, w] latent"))?;
        if self.mean.elem_count() != c {
            bail!(
                "{what}: latent has {c} channels but the VAE batch-norm has {} (patchify first?)",
                self.mean.elem_count()
            );
        }
        Ok(())
    }

    /// `(z - mean) / std` (spec §4 step 6); each op rounds once in z's dtype.
    pub fn normalize(&self, z: &Tensor) -> Result<Tensor> {
        self.check(z, "bn normalize")?;
        let dtype = z.dtype();
        let (z, mean, std) = (
            z.to_dtype(DType::F32)?,
            self.mean.to_dtype(DType::F32)?,
            self.std.to_dtype(DType::F32)?,
        );
        let centred = op_in(dtype, || z.broadcast_sub(&mean))?;
        op_in(dtype, || centred.to_dtype(DType::F32)?.broadcast_div(&std))
    }

    /// `x * std + mean` (spec §6.4); the multiply and the add each round once in x's dtype
    /// (no fused multiply-add).
    pub fn denormalize(&self, x: &Tensor) -> Result<Tensor> {
        self.check(x, "bn denormalize")?;
        let dtype = x.dtype();
        let (x, mean, std) = (
            x.to_dtype(DType::F32)?,
            self.mean.to_dtype(DType::F32)?,
            self.std.to_dtype(DType::F32)?,
        );
        let scaled = op_in(dtype, || x.broadcast_mul(&std))?;
        op_in(dtype, || scaled.to_dtype(DType::F32)?.broadcast_add(&mean))
    }
}

/// Reference-latent normalisation of `_encode_vae_image` (spec §4 step 6) for a patchified
/// `[B,C,h,w]` latent: [`BnStats::new`] in z's dtype, then [`BnStats::normalize`].
pub fn bn_normalize(
    z: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    BnStats::new(running_mean, running_var, eps, z.dtype())?.normalize(z)
}

/// Decode-side de-normalisation (spec §6.4) of an unpacked `[B,C,h,w]` latent:
/// [`BnStats::new`] in x's dtype, then [`BnStats::denormalize`].
pub fn bn_denormalize(
    x: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    BnStats::new(running_mean, running_var, eps, x.dtype())?.denormalize(x)
}

/// Position ids of one latent grid: `[h·w, 4]` i64, rows `(t, y, x, 0)` in row-major order
/// (`torch.cartesian_prod(t, arange(h), arange(w), arange(1))`). t = 0 for the generated image,
/// [`reference_time`] for reference images.
pub fn image_ids(t: i64, h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(h * w * 4);
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            v.extend_from_slice(&[t, y, x, 0]);
        }
    }
    Ok(Tensor::from_vec(v, (h * w, 4), device)?)
}

/// Text position ids: `[len, 4]` i64, rows `(0, 0, 0, l)` (spec §2.4).
pub fn text_ids(len: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<i64> = (0..len as i64).flat_map(|l| [0, 0, 0, l]).collect();
    Ok(Tensor::from_vec(v, (len, 4), device)?)
}

/// T coordinate of reference image `index` (0-based): `10 + 10·index` (spec §4 step 8).
pub fn reference_time(index: usize) -> i64 {
    10 * (index as i64 + 1)
}

/// Ids of all reference images, concatenated in image order: `[Σ h_i·w_i, 4]`, reference i with
/// T = [`reference_time`]`(i)`. `grids` are the patchified `(h, w)` of each reference.
pub fn reference_ids(grids: &[(usize, usize)], device: &Device) -> Result<Tensor> {
    if grids.is_empty() {
        bail!("reference_ids: no reference grids given");
    }
    let parts = grids
        .iter()
        .enumerate()
        .map(|(i, &(h, w))| image_ids(reference_time(i), h, w, device))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

/// `[N, 4]` ids repeated over the batch: `[batch, N, 4]` (contiguous).
pub fn batch_ids(ids: &Tensor, batch: usize) -> Result<Tensor> {
    let (n, k) = ids.dims2().context("batch_ids: expected [N, 4] ids")?;
    Ok(ids.unsqueeze(0)?.expand((batch, n, k))?.contiguous()?)
}

/// Packed grid `(h, w)` of an output image (spec §3.1, §8): `(H // 16, W // 16)`; sizes that are
/// not multiples of 16 are floored, as diffusers does (`2 * (H // 16) // 2`).
pub fn latent_grid(height_px: usize, width_px: usize) -> Result<(usize, usize)> {
    let (h, w) = (height_px / 16, width_px / 16);
    if h == 0 || w == 0 {
        bail!("image size {width_px}×{height_px} is too small: both sides must be at least 16 px");
    }
    Ok((h, w))
}
