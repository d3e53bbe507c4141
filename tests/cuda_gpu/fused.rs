//! The fused bf16 CUDA kernels (src/cuda/kernels/fused.cu) against the candle reference ops
//! they replace, on the GPU. Skipped (passes with a message) where no CUDA device is present.

use candle_core::{DType, Device, Tensor, D};
use flux2_klein::cuda::fused;

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("no CUDA device: skipped ({e})");
            None
        }
    }
}

fn randn(shape: &[usize], scale: f64, dev: &Device) -> Tensor {
    (Tensor::randn(0f32, 1f32, shape, dev).unwrap() * scale)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
}

/// max |a - b| / max |b|, both taken to f32.
fn rel(name: &str, a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "{name}: shapes");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().max(0).unwrap();
    let m = b.abs().unwrap().max(0).unwrap();
    let r = d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1e-30);
    eprintln!("{name}: max rel err {r:.3e}");
    r
}

/// The fraction of elements of `a` bit-identical to those of `b`.
fn fraction_equal(a: &Tensor, b: &Tensor) -> f32 {
    a.eq(b)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn silu_ref(x: &Tensor) -> Tensor {
    x.to_dtype(DType::F32)
        .unwrap()
        .silu()
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
}

#[test]
fn swiglu_matches_reference() {
    let Some(dev) = gpu() else { return };
    // A plain [B, N, 2F] tensor and a narrow of a wider fused projection.
    let u = randn(&[2, 333, 2 * 96], 2.0, &dev);
    let wide = randn(&[1, 77, 3 * 32 + 2 * 80], 2.0, &dev);
    for (name, u) in [
        ("swiglu contiguous", u),
        ("swiglu narrow", wide.narrow(2, 96, 160).unwrap()),
    ] {
        let f = u.dim(D::Minus1).unwrap() / 2;
        let reference = (silu_ref(&u.narrow(D::Minus1, 0, f).unwrap())
            * u.narrow(D::Minus1, f, f).unwrap())
        .unwrap();
        let ours = fused::swiglu(&u).unwrap();
        assert!(rel(name, &ours, &reference) <= 1e-2);
    }
}

#[test]
fn prefixed_swiglu_equals_cat_of_swiglu() {
    let Some(dev) = gpu() else { return };
    // The single-stream block: attention output [B, S, D] beside swiglu of the MLP part of
    // the fused projection (a narrow), one pass; bit-identical to cat(o, swiglu(u)).
    let (d, f) = (96, 80);
    let wide = randn(&[1, 77, 3 * d + 2 * f], 2.0, &dev);
    let u = wide.narrow(2, 3 * d, 2 * f).unwrap();
    let o = randn(&[1, 77, d], 1.0, &dev);
    let reference = Tensor::cat(&[&o, &fused::swiglu(&u).unwrap()], 2).unwrap();
    let ours = fused::prefixed_swiglu(&o, &u).unwrap();
    assert_eq!(ours.dims(), &[1, 77, d + f]);
    assert_eq!(fraction_equal(&ours, &reference), 1.0);
}

#[test]
fn modulate_matches_reference() {
    let Some(dev) = gpu() else { return };
    let x = randn(&[2, 129, 3072], 1.0, &dev);
    let m = randn(&[2, 1, 6 * 3072], 0.5, &dev);
    let (shift, scale) = (
        m.narrow(2, 0, 3072).unwrap(),
        m.narrow(2, 3072, 3072).unwrap(),
    );
    let reference = x
        .broadcast_mul(&(&scale + 1.0).unwrap())
        .unwrap()
        .broadcast_add(&shift)
        .unwrap();
    let ours = fused::modulate(&x, &scale, &shift).unwrap();
    assert!(rel("modulate", &ours, &reference) <= 1e-2);
}

#[test]
fn rope_bshd_matches_rope_i() {
    let Some(dev) = gpu() else { return };
    let (b, s, h, d) = (1, 600, 24, 128);
    let x = randn(&[b, s, h, d], 1.0, &dev);
    let angles = Tensor::rand(0f32, 50f32, (s, d / 2), &dev).unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let reference = candle_nn::rotary_emb::rope_i(
        &x.transpose(1, 2)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .contiguous()
            .unwrap(),
        &cos,
        &sin,
    )
    .unwrap()
    .transpose(1, 2)
    .unwrap()
    .to_dtype(DType::BF16)
    .unwrap();
    let ours = fused::rope_bshd(&x, &cos, &sin).unwrap();
    assert!(rel("rope_bshd", &ours, &reference) <= 1e-2);
}

#[test]
fn group_norm_matches_reference() {
    let Some(dev) = gpu() else { return };
    let (b, c, h, w, g) = (2, 64, 48, 40, 32);
    // An offset mean so that a naive E[x²] − E[x]² would lose precision.
    let x = (randn(&[b, c, h, w], 1.5, &dev)
        .to_dtype(DType::F32)
        .unwrap()
        + 3.0)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let weight = Tensor::randn(1f32, 0.2f32, c, &dev).unwrap();
    let bias = Tensor::randn(0f32, 0.1f32, c, &dev).unwrap();
    let xs = x
        .to_dtype(DType::F32)
        .unwrap()
        .reshape((b, g, c / g * h * w))
        .unwrap();
    let mean = xs.mean_keepdim(2).unwrap();
    let xc = xs.broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(2).unwrap();
    let normed = xc
        .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
        .unwrap()
        .reshape((b, c, h, w))
        .unwrap()
        .broadcast_mul(&weight.reshape((1, c, 1, 1)).unwrap())
        .unwrap()
        .broadcast_add(&bias.reshape((1, c, 1, 1)).unwrap())
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let ours = fused::group_norm(&x, &weight, &bias, g, 1e-6, false).unwrap();
    assert!(rel("group_norm", &ours, &normed) <= 1e-2);
    let ours_silu = fused::group_norm(&x, &weight, &bias, g, 1e-6, true).unwrap();
    assert!(rel("group_norm+silu", &ours_silu, &silu_ref(&normed)) <= 1e-2);
}

/// The tensor-core cuDNN conv (`cuda::conv`) against candle's f32 conv of the same bf16
/// values, for the VAE's conv kinds: 3×3 pad 1, 1×1 (shortcuts, quant convs), 3×3 stride 2
/// pad 0 (downsample after its asymmetric pad), odd sizes and batch 2, plus a strided input.
#[cfg(feature = "cudnn")]
#[test]
fn cudnn_conv_matches_reference() {
    use flux2_klein::cuda::conv;
    let Some(dev) = gpu() else { return };
    let cases: [(&[usize], [usize; 2], usize, usize); 5] = [
        (&[1, 64, 33, 47], [96, 3], 1, 1),
        (&[2, 32, 16, 24], [64, 1], 0, 1),
        (&[1, 128, 65, 65], [128, 3], 0, 2),
        (&[1, 512, 128, 128], [512, 3], 1, 1),
        (&[1, 128, 512, 512], [128, 3], 1, 1),
    ];
    for (x_shape, [cout, k], padding, stride) in cases {
        let x = randn(x_shape, 1.0, &dev);
        let w = randn(&[cout, x_shape[1], k, k], 0.05, &dev);
        assert!(conv::applies(&x));
        let reference = x
            .to_dtype(DType::F32)
            .unwrap()
            .conv2d(&w.to_dtype(DType::F32).unwrap(), padding, stride, 1, 1)
            .unwrap();
        let ours = conv::conv2d(&x, &w, padding, stride).unwrap();
        assert_eq!(ours.dtype(), DType::BF16);
        let name = format!("cudnn conv {x_shape:?} k{k} p{padding} s{stride} -> {cout}");
        // bf16 output rounding (2^-8 relative) plus f32-accumulation order.
        assert!(rel(&name, &ours, &reference) <= 8e-3, "{name}");
    }
    // A non-contiguous input (a channel slice) is made contiguous first.
    let wide = randn(&[1, 48, 20, 20], 1.0, &dev);
    let x = wide.narrow(1, 8, 32).unwrap();
    let w = randn(&[16, 32, 3, 3], 0.05, &dev);
    let reference = x
        .to_dtype(DType::F32)
        .unwrap()
        .conv2d(&w.to_dtype(DType::F32).unwrap(), 1, 1, 1, 1)
        .unwrap();
    let ours = conv::conv2d(&x, &w, 1, 1).unwrap();
    assert!(rel("cudnn conv strided input", &ours, &reference) <= 8e-3);
}

/// The fused q/k RMSNorm + RoPE against the two-kernel path it replaces (candle's
/// `rms_norm`, then `rope_bshd`), on strided views of a wider projection and with two
/// segments (the double-stream blocks' text + image tokens, each with its own weight).
#[test]
fn rmsnorm_rope_matches_norm_then_rope() {
    let Some(dev) = gpu() else { return };
    let (b, h, d) = (2, 6, 128);
    let (l, n) = (37, 70);
    let eps = 1e-6f32;
    // A fused projection [B, S, 5·H·D]: q is columns [H·D, 2·H·D), a strided view.
    let wide_txt = randn(&[b, l, 5 * h * d], 3.0, &dev);
    let wide_img = randn(&[b, n, 5 * h * d], 3.0, &dev);
    let view = |t: &Tensor| {
        t.reshape((b, t.dim(1).unwrap(), 5 * h, d))
            .unwrap()
            .narrow(2, h, h)
            .unwrap()
    };
    let (x_txt, x_img) = (view(&wide_txt), view(&wide_img));
    assert!(!x_img.is_contiguous());
    let w_txt = randn(&[d], 1.0, &dev);
    let w_img = randn(&[d], 1.0, &dev);
    let angles = Tensor::rand(0f32, 50f32, (l + n, d / 2), &dev).unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let norm = |x: &Tensor, w: &Tensor| {
        candle_nn::ops::rms_norm(&x.contiguous().unwrap(), w, eps).unwrap()
    };
    let f32w = |w: &Tensor| w.to_dtype(DType::F32).unwrap();

    let joined = Tensor::cat(&[norm(&x_txt, &w_txt), norm(&x_img, &w_img)], 1).unwrap();
    let reference = fused::rope_bshd(&joined, &cos, &sin).unwrap();
    let (wt, wi) = (f32w(&w_txt), f32w(&w_img));
    let segments = [
        fused::NormSegment {
            x: &x_txt,
            weight: &wt,
        },
        fused::NormSegment {
            x: &x_img,
            weight: &wi,
        },
    ];
    let ours = fused::rmsnorm_rope(&segments, &cos, &sin, eps).unwrap();
    assert_eq!(ours.dims(), &[b, l + n, h, d]);
    assert!(rel("rmsnorm_rope 2 segments", &ours, &reference) <= 1e-2);

    // One segment (the single-stream blocks), table rows 0..n.
    let (cos1, sin1) = (cos.narrow(0, 0, n).unwrap(), sin.narrow(0, 0, n).unwrap());
    let reference = fused::rope_bshd(&norm(&x_img, &w_img), &cos1, &sin1).unwrap();
    let seg = [fused::NormSegment {
        x: &x_img,
        weight: &wi,
    }];
    let ours = fused::rmsnorm_rope(
        &seg,
        &cos1.contiguous().unwrap(),
        &sin1.contiguous().unwrap(),
        eps,
    )
    .unwrap();
    assert!(rel("rmsnorm_rope 1 segment", &ours, &reference) <= 1e-2);
    let same = fraction_equal(&ours, &reference);
    eprintln!(
        "rmsnorm_rope: {:.4} of the elements bit-identical to norm-then-rope",
        same
    );
}

/// LayerNorm + modulation and the gated residual against the candle op chains they replace
/// (the transformer's reference path), at the klein width D = 3072 and an odd row count.
#[test]
fn layernorm_modulate_and_gated_residual_match_reference() {
    let Some(dev) = gpu() else { return };
    let (b, n, d) = (2, 301, 3072);
    // An offset mean makes E[x²] - mean² style variances lose precision; ours must not.
    let x = (randn(&[b, n, d], 2.0, &dev).to_dtype(DType::F32).unwrap() + 5.0)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let scale = randn(&[b, 1, d], 0.5, &dev);
    let shift = randn(&[b, 1, d], 0.5, &dev);
    let eps = 1e-6f32;
    // torch: LayerNorm in f32 rounded once, then (1 + scale) * ln + shift, each op in bf16.
    let xf = x.to_dtype(DType::F32).unwrap();
    let mean = xf.mean_keepdim(2).unwrap();
    let centred = xf.broadcast_sub(&mean).unwrap();
    let var = centred.sqr().unwrap().mean_keepdim(2).unwrap();
    let ln = centred
        .broadcast_div(&(var + eps as f64).unwrap().sqrt().unwrap())
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let reference = ln
        .broadcast_mul(&(&scale + 1.0).unwrap())
        .unwrap()
        .broadcast_add(&shift)
        .unwrap();
    let ours = fused::layernorm_modulate(&x, &scale, &shift, eps).unwrap();
    assert!(rel("layernorm_modulate", &ours, &reference) <= 1e-2);

    let y = randn(&[b, n, d], 1.0, &dev);
    let gate = randn(&[b, 1, d], 1.0, &dev);
    let reference = (&x + y.broadcast_mul(&gate).unwrap()).unwrap();
    let ours = fused::gated_residual(&x, &y, &gate).unwrap();
    assert!(rel("gated_residual", &ours, &reference) <= 1e-2);
    let exact = fraction_equal(&ours, &reference);
    eprintln!("gated_residual: {exact:.4} of the elements bit-identical to the candle ops");
    assert!(
        exact > 0.999,
        "gated residual must round like the candle ops"
    );
}

/// The conv bias add against candle's broadcast add (both round `x + b` once: equal bits),
/// on a plane size that takes the 16-byte path and one that does not.
#[test]
fn channel_bias_matches_broadcast_add() {
    let Some(dev) = gpu() else { return };
    for (h, w) in [(64, 96), (9, 13)] {
        let x = randn(&[2, 40, h, w], 3.0, &dev);
        let bias = randn(&[40], 1.0, &dev);
        let reference = x
            .broadcast_add(&bias.reshape((1, 40, 1, 1)).unwrap())
            .unwrap();
        let ours = fused::add_channel_bias(&x, &bias).unwrap();
        assert_eq!(ours.dims(), reference.dims());
        let same = fraction_equal(&ours, &reference);
        eprintln!("channel_bias {h}x{w}: {same:.4} of the elements bit-identical");
        assert_eq!(same, 1.0, "channel_bias {h}x{w}");
    }
}

#[test]
fn qwen3_silu_mul_and_rms_norm_match_reference() {
    let Some(dev) = gpu() else { return };
    // The text encoder's MLP activation, [B, L, I] (odd I: the scalar path too).
    for dims in [[1usize, 512, 9728], [2, 37, 301]] {
        let (gate, up) = (randn(&dims, 2.0, &dev), randn(&dims, 1.0, &dev));
        let reference = (silu_ref(&gate) * &up).unwrap();
        let ours = fused::silu_mul(&gate, &up).unwrap();
        assert!(rel("silu_mul", &ours, &reference) <= 1e-2);
        assert!(fraction_equal(&ours, &reference) >= 0.99);
    }
    // Qwen3RMSNorm over the hidden states [1, 512, 2560] and per head [1, 512, 32, 128]:
    // candle's f32 rms_norm (unit weight) rounded, then × weight in bf16.
    for dims in [&[1usize, 512, 2560][..], &[1, 512, 32, 128], &[1, 9, 4, 8]] {
        let d = *dims.last().unwrap();
        let x = randn(dims, 3.0, &dev);
        let w = (randn(&[d], 0.2, &dev).to_dtype(DType::F32).unwrap() + 1.0)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let ones = Tensor::ones(d, DType::F32, &dev).unwrap();
        let normed = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32).unwrap(), &ones, 1e-6)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let reference = normed.broadcast_mul(&w).unwrap();
        let ours = fused::rms_norm_scale(&x, &w, 1e-6).unwrap();
        assert!(rel("rms_norm_scale", &ours, &reference) <= 1e-2);
        assert!(fraction_equal(&ours, &reference) >= 0.99);
    }
}
