//! Tiled VAE decode/encode for outputs too large for one pass (off by default), following
//! diffusers' `AutoencoderKLFlux2.tiled_decode` / `_tiled_encode` with `blend_v` / `blend_h`.
//!
//! The latent is cut into `tile × tile` tiles whose starts are `tile - overlap` apart; each
//! tile is decoded on its own; each tile is blended linearly with its upper and left
//! neighbours over `overlap·8` pixels (weights `y / blend` for the current tile,
//! `1 - y / blend` for the neighbour), then cropped to `(tile - overlap)·8` pixels and the
//! crops are concatenated. With diffusers' defaults (`tile_latent_min_size = sample_size/8`,
//! `tile_overlap_factor = 0.25`) this is `TileOptions { tile: 128, overlap: 32 }`.
//!
//! The mid-block attention is global, so a tiled result differs slightly from the untiled one
//! (expected, as in diffusers); the tiling itself reproduces diffusers' tiled result (tested
//! against a diffusers-made fixture).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use super::AutoencoderKLFlux2;

/// Tile geometry in *latent* pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileOptions {
    /// Tile side in latent pixels (pixel tiles are `tile · 8`).
    pub tile: usize,
    /// Overlap between neighbouring tiles in latent pixels; must be `< tile`.
    pub overlap: usize,
}

impl TileOptions {
    /// diffusers' defaults for a config: `tile = sample_size / 8`, overlap a quarter of it.
    pub fn diffusers_default(cfg: &super::AutoencoderKLFlux2Config) -> Self {
        Self::with_default_overlap(cfg.default_tile_latent_size())
    }

    /// `tile` latent pixels with diffusers' overlap factor 0.25 (`overlap = tile / 4`).
    pub fn with_default_overlap(tile: usize) -> Self {
        Self {
            tile,
            overlap: tile / 4,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.tile == 0 || self.overlap >= self.tile {
            bail!(
                "tile options {self:?}: need tile > 0 and overlap < tile (e.g. tile 64, overlap 16)"
            );
        }
        Ok(())
    }

    /// Start offsets of the tiles along an axis of `len` (latent or pixel units, given the
    /// tile `step`), as diffusers' `range(0, len, step)`.
    pub fn starts(len: usize, step: usize) -> Vec<usize> {
        (0..len).step_by(step.max(1)).collect()
    }
}

/// `b[.., :e, ..] = a[.., -e:, ..]·(1 - y/e) + b[.., :e, ..]·(y/e)` along `dim` (2 = rows,
/// 3 = columns), `e = min(a_len, b_len, extent)`: diffusers' `blend_v` / `blend_h`.
///
/// Roundings as torch's: the weights are Python floats (f64) rounded to f32 (the scalar type
/// of the op), each product is computed in f32 and rounded to the tensor dtype, then the sum
/// is rounded (a no-op chain in f32).
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let (a_len, b_len) = (a.dim(dim)?, b.dim(dim)?);
    let e = extent.min(a_len).min(b_len);
    if e == 0 {
        return Ok(b.clone());
    }
    let dt = b.dtype();
    let mut shape = vec![1usize; 4];
    shape[dim] = e;
    let weights = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
        let w: Vec<f32> = (0..e).map(|y| f(y as f64 / e as f64) as f32).collect();
        Ok(Tensor::from_vec(w, shape.clone(), b.device())?)
    };
    let wa = weights(&|r| 1.0 - r)?;
    let wb = weights(&|r| r)?;
    let a_tail = a.narrow(dim, a_len - e, e)?.to_dtype(DType::F32)?;
    let b_head = b.narrow(dim, 0, e)?.to_dtype(DType::F32)?;
    let pa = a_tail.broadcast_mul(&wa)?.to_dtype(dt)?;
    let pb = b_head.broadcast_mul(&wb)?.to_dtype(dt)?;
    let mixed = (pa + pb)?;
    if e == b_len {
        return Ok(mixed);
    }
    Ok(Tensor::cat(&[&mixed, &b.narrow(dim, e, b_len - e)?], dim)?)
}

/// Runs `f` on overlapping tiles of `x` (tile side `tile_in`, stride `step_in`), blends the
/// outputs over `blend_out` and crops each to `keep_out`, as diffusers' tiled loops do.
fn tiled(
    x: &Tensor,
    tile_in: usize,
    step_in: usize,
    blend_out: usize,
    keep_out: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let rows_at = TileOptions::starts(h, step_in);
    let cols_at = TileOptions::starts(w, step_in);
    let mut rows: Vec<Vec<Tensor>> = Vec::with_capacity(rows_at.len());
    for &i in &rows_at {
        let mut row = Vec::with_capacity(cols_at.len());
        for &j in &cols_at {
            let t = x
                .narrow(2, i, tile_in.min(h - i))?
                .narrow(3, j, tile_in.min(w - j))?;
            row.push(f(&t).with_context(|| format!("tile at latent/pixel offset ({i}, {j})"))?);
        }
        rows.push(row);
    }
    // diffusers' blend_v/blend_h modify the current tile *in place*, so later tiles blend with
    // their already-blended upper and left neighbours (uncropped); `rows` is updated the same way.
    let mut out_rows = Vec::with_capacity(rows.len());
    for ri in 0..rows.len() {
        let mut out_row = Vec::with_capacity(rows[ri].len());
        for ci in 0..rows[ri].len() {
            let mut t = rows[ri][ci].clone();
            if ri > 0 {
                t = blend(&rows[ri - 1][ci], &t, blend_out, 2)?;
            }
            if ci > 0 {
                t = blend(&rows[ri][ci - 1], &t, blend_out, 3)?;
            }
            let th = t.dim(2)?.min(keep_out);
            let tw = t.dim(3)?.min(keep_out);
            out_row.push(t.narrow(2, 0, th)?.narrow(3, 0, tw)?);
            rows[ri][ci] = t;
        }
        out_rows.push(Tensor::cat(&out_row, 3)?);
    }
    Ok(Tensor::cat(&out_rows, 2)?)
}

impl AutoencoderKLFlux2 {
    /// Whether [`Self::decode_tiled`] takes the tiled path for a latent of `h × w`.
    pub fn decode_uses_tiles(h: usize, w: usize, opts: TileOptions) -> bool {
        h > opts.tile || w > opts.tile
    }

    /// Tiled `decode` (diffusers `tiled_decode`): `z` `[B,latent,h,w]` → `[B,3,8h,8w]`. Falls
    /// back to [`Self::decode`] when `z` fits in one tile (diffusers' `_decode` condition).
    pub fn decode_tiled(&self, z: &Tensor, opts: TileOptions) -> Result<Tensor> {
        opts.validate()?;
        let z = self.prepare(z, "decode_tiled", self.cfg.latent_channels, 1)?;
        let (_, _, h, w) = z.dims4()?;
        if !Self::decode_uses_tiles(h, w, opts) {
            return self.decode_raw(&z).context("VAE decode");
        }
        let f = self.scale_factor();
        tiled(
            &z,
            opts.tile,
            opts.tile - opts.overlap,
            opts.overlap * f,
            (opts.tile - opts.overlap) * f,
            |t| self.decode_raw(t),
        )
        .context("VAE tiled decode")
    }

    /// Tiled `encode_mean` (diffusers `_tiled_encode`, then the mean): tiles of `tile·8`
    /// pixels every `(tile - overlap)·8` pixels, blended over `overlap` latent pixels. Falls
    /// back to [`Self::encode_mean`] when the image fits in one tile.
    pub fn encode_mean_tiled(&self, x: &Tensor, opts: TileOptions) -> Result<Tensor> {
        opts.validate()?;
        let f = self.scale_factor();
        let x = self.prepare(x, "encode_tiled", self.cfg.in_channels, f)?;
        let (_, _, h, w) = x.dims4()?;
        let tile_px = opts.tile * f;
        let moments = if h > tile_px || w > tile_px {
            tiled(
                &x,
                tile_px,
                (opts.tile - opts.overlap) * f,
                opts.overlap,
                opts.tile - opts.overlap,
                |t| self.encode_moments_raw(t),
            )
            .context("VAE tiled encode")?
        } else {
            self.encode_moments_raw(&x).context("VAE encode")?
        };
        Ok(moments.narrow(1, 0, self.cfg.latent_channels)?)
    }
}
