//! The fused CUDA attention kernel against the naive path, on a GPU (skipped without one).
//!
//! Reference: `naive_attention` in f32 on the *same* (bf16/f16-rounded) inputs, so the measured
//! error is the kernel's own (bf16 output rounding, probabilities rounded before P·V, ex2.approx)
//! and not the input rounding. For scale, the error of the current model path (naive attention
//! in bf16) is printed next to it.
//!
//! Run with `--test-threads=1 --nocapture` to see the numbers.

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use flux2_klein::cuda::{
    flash_attention, is_supported, naive_attention, naive_causal_attention, AttnLayout, AttnMask,
    FlashParams,
};
use std::time::Instant;

/// [`FlashParams`] without a mask.
fn unmasked(scale: f32, layout: AttnLayout) -> FlashParams<'static> {
    FlashParams {
        scale,
        layout,
        mask: AttnMask::None,
    }
}

/// [`FlashParams`] with the causal, right-padded mask.
fn causal(scale: f32, layout: AttnLayout, kv_valid: &[usize]) -> FlashParams<'_> {
    FlashParams {
        scale,
        layout,
        mask: AttnMask::Causal { kv_valid },
    }
}

fn cuda_device() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            let why = e.to_string();
            let why = why.lines().next().unwrap_or("");
            println!("no CUDA device: skipped ({why})");
            None
        }
    }
}

fn max_abs(t: &Tensor) -> Result<f32> {
    t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    max_abs(&(a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?)
}

/// Random `[b, s, h, d]` (if `bshd`) or `[b, h, s, d]` tensor in `dtype`, scaled by `gain`.
fn rand(dev: &Device, dims: [usize; 4], dtype: DType, gain: f64) -> Result<Tensor> {
    (Tensor::randn(0f32, 1f32, &dims[..], dev)? * gain)?.to_dtype(dtype)
}

struct Case {
    b: usize,
    h: usize,
    sq: usize,
    sk: usize,
    d: usize,
    dtype: DType,
    /// "bhsd", "bshd" (AttnLayout::Bshd) or "fused-qkv" (q/k/v are strided views of one
    /// [B, S, 3, H, D] tensor, passed transposed to flash_attention).
    layout: &'static str,
    /// Multiplies q: a larger gain makes the softmax peakier (stresses the online max).
    gain: f64,
}

const fn case(b: usize, h: usize, sq: usize, sk: usize, d: usize, layout: &'static str) -> Case {
    Case {
        b,
        h,
        sq,
        sk,
        d,
        dtype: DType::BF16,
        layout,
        gain: 1.0,
    }
}

/// Returns (flash error, naive-in-dtype error, max |ref|), all vs f32 naive on the same inputs.
fn run_case(dev: &Device, c: &Case) -> Result<(f32, f32, f32)> {
    let scale = 1.0 / (c.d as f32).sqrt();
    let (q, k, v, out_bhsd) = match c.layout {
        "bhsd" => {
            let q = rand(dev, [c.b, c.h, c.sq, c.d], c.dtype, c.gain)?;
            let k = rand(dev, [c.b, c.h, c.sk, c.d], c.dtype, 1.0)?;
            let v = rand(dev, [c.b, c.h, c.sk, c.d], c.dtype, 1.0)?;
            let o = flash_attention(&q, &k, &v, &unmasked(scale, AttnLayout::Bhsd))?;
            (q, k, v, o)
        }
        "bshd" => {
            let q = rand(dev, [c.b, c.sq, c.h, c.d], c.dtype, c.gain)?;
            let k = rand(dev, [c.b, c.sk, c.h, c.d], c.dtype, 1.0)?;
            let v = rand(dev, [c.b, c.sk, c.h, c.d], c.dtype, 1.0)?;
            let o = flash_attention(&q, &k, &v, &unmasked(scale, AttnLayout::Bshd))?;
            assert_eq!(o.dims(), &[c.b, c.sq, c.h, c.d]);
            let t = |x: &Tensor| x.transpose(1, 2);
            (t(&q)?, t(&k)?, t(&v)?, t(&o)?)
        }
        "fused-qkv" => {
            assert_eq!(c.sq, c.sk);
            let qkv = rand(dev, [c.b, c.sq, 3, c.h * c.d], c.dtype, 1.0)?
                .reshape((c.b, c.sq, 3, c.h, c.d))?;
            // Strided views, no copies: [B, H, S, D] with strides (S*3*H*D, D, 3*H*D, 1).
            let q = qkv.i((.., .., 0))?.transpose(1, 2)?;
            let k = qkv.i((.., .., 1))?.transpose(1, 2)?;
            let v = qkv.i((.., .., 2))?.transpose(1, 2)?;
            let o = flash_attention(&q, &k, &v, &unmasked(scale, AttnLayout::Bhsd))?;
            (q, k, v, o)
        }
        other => panic!("unknown layout {other}"),
    };
    assert_eq!(out_bhsd.dims(), &[c.b, c.h, c.sq, c.d]);
    assert_eq!(out_bhsd.dtype(), c.dtype);
    let f = |x: &Tensor| x.to_dtype(DType::F32);
    let reference = naive_attention(&f(&q)?, &f(&k)?, &f(&v)?, scale)?;
    let naive_lowp = naive_attention(&q, &k, &v, scale)?;
    let err = max_abs_diff(&out_bhsd, &reference)?;
    let err_naive = max_abs_diff(&naive_lowp, &reference)?;
    let finite = out_bhsd
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|x| x.is_finite());
    let err = if finite { err } else { f32::INFINITY };
    Ok((err, err_naive, max_abs(&reference)?))
}

#[test]
fn causal_flash_attention_matches_masked_reference() -> Result<()> {
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    // (heads, kv heads, seq, head dim, real tokens per batch row): Qwen3-4B's text encoder
    // (32 heads over 8 K/V heads, 512 tokens, a short prompt and a CFG negative prompt), a
    // tile-edge length, a full row, one real token, D = 64.
    let cases: [(usize, usize, usize, usize, &[usize]); 5] = [
        (32, 8, 512, 128, &[26, 512]),
        (8, 8, 300, 128, &[64]),
        (4, 2, 200, 128, &[200]),
        (4, 1, 77, 128, &[1]),
        (6, 3, 150, 64, &[100, 37]),
    ];
    let mut failures = Vec::new();
    for (h, hk, s, d, valid) in cases {
        let b = valid.len();
        let q = rand(&dev, [b, h, s, d], DType::BF16, 1.0)?;
        let k = rand(&dev, [b, hk, s, d], DType::BF16, 1.0)?;
        let v = rand(&dev, [b, hk, s, d], DType::BF16, 1.0)?;
        let scale = 1.0 / (d as f32).sqrt();
        let params = causal(scale, AttnLayout::Bhsd, valid);
        assert!(is_supported(&q, &k, &v, &params));
        let ours = flash_attention(&q, &k, &v, &params)?;
        // The [B, S, H, D] layout (the text encoder's) computes the same numbers.
        let t = |x: &Tensor| x.transpose(1, 2)?.contiguous();
        let params_bshd = causal(scale, AttnLayout::Bshd, valid);
        let ours_bshd = flash_attention(&t(&q)?, &t(&k)?, &t(&v)?, &params_bshd)?;
        let layout_diff = max_abs_diff(&ours_bshd.transpose(1, 2)?, &ours)?;
        if layout_diff != 0.0 {
            failures.push(format!(
                "H={h} S={s}: bshd differs from bhsd by {layout_diff:.3e}"
            ));
        }
        // Each batch row against f32 masked attention on the same rounded values.
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        for (row, &n) in valid.iter().enumerate() {
            let (qr, kr, vr) = (q.i(row..row + 1)?, k.i(row..row + 1)?, v.i(row..row + 1)?);
            let reference = naive_causal_attention(&f(&qr)?, &f(&kr)?, &f(&vr)?, scale, n)?;
            let err = max_abs_diff(&ours.i(row..row + 1)?, &reference)?;
            let top = max_abs(&reference)?;
            let ok = err <= 1e-2 * top.max(1e-3);
            println!(
                "causal H={h} Hkv={hk} S={s} D={d} real={n}: max abs err {err:.3e} (max |ref| {top:.3e}) {}",
                if ok { "ok" } else { "FAIL" }
            );
            if !ok {
                failures.push(format!("H={h} S={s} D={d} real={n}: {err:.3e}"));
            }
        }
    }
    assert!(failures.is_empty(), "causal kernel errors: {failures:?}");
    Ok(())
}

#[test]
fn flash_attention_matches_naive() -> Result<()> {
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    let mut cases = vec![
        case(1, 2, 40, 40, 16, "bhsd"),
        case(1, 3, 77, 77, 32, "bhsd"),
        case(2, 24, 600, 600, 128, "bhsd"),
        case(1, 24, 4608, 4608, 128, "bhsd"),
        case(1, 4, 300, 1000, 64, "bhsd"),  // Sq < Sk
        case(1, 4, 1000, 129, 128, "bshd"), // Sq > Sk, one key past a tile
        case(2, 3, 130, 257, 40, "bhsd"),   // head dim padded to 64
        case(1, 2, 65, 70, 96, "bshd"),     // head dim padded to 128
        case(1, 2, 100, 50, 256, "bhsd"),
        case(1, 2, 33, 1, 8, "bhsd"), // a single key: output = v
        case(1, 3, 200, 200, 128, "fused-qkv"),
        case(2, 24, 517, 517, 128, "bshd"),
    ];
    cases.push(Case {
        gain: 8.0,
        ..case(1, 8, 700, 700, 128, "bhsd")
    });
    cases.push(Case {
        dtype: DType::F16,
        ..case(1, 3, 77, 200, 32, "bhsd")
    });
    cases.push(Case {
        dtype: DType::F16,
        ..case(2, 24, 600, 600, 128, "bshd")
    });

    // Warm-up: the first call compiles the kernels with NVRTC.
    let t0 = Instant::now();
    let x = rand(&dev, [1, 1, 16, 128], DType::BF16, 1.0)?;
    flash_attention(&x, &x, &x, &unmasked(1.0, AttnLayout::Bhsd))?;
    dev.synchronize()?;
    println!(
        "NVRTC compile + module load + first launch: {:.2} s",
        t0.elapsed().as_secs_f64()
    );

    let mut failures = Vec::new();
    for c in &cases {
        let (err, err_naive, ref_max) = run_case(&dev, c)?;
        // bf16 output rounding alone is 2^-9 relative; P rounded to bf16 before P·V adds a
        // similar amount. 1e-2 of the output range leaves room without hiding real bugs
        // (a wrong tile, mask or rescale gives errors of order max|ref|).
        let tol = 1e-2 * ref_max.max(1e-3);
        let ok = err <= tol;
        println!(
            "{} B={} H={} Sq={} Sk={} D={} {:?} {} gain={}: flash max abs err {:.3e} \
             (rel {:.2e}, tol {:.1e}); naive {:?} err {:.3e}; max|ref| {:.3}",
            if ok { "OK " } else { "BAD" },
            c.b,
            c.h,
            c.sq,
            c.sk,
            c.d,
            c.dtype,
            c.layout,
            c.gain,
            err,
            err / ref_max,
            tol,
            c.dtype,
            err_naive,
            ref_max
        );
        if !ok {
            failures.push(format!(
                "B={} H={} Sq={} Sk={} D={} {:?} {}: err {err:.3e} > tol {tol:.1e}",
                c.b, c.h, c.sq, c.sk, c.d, c.dtype, c.layout
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "flash attention mismatches: {failures:#?}"
    );
    Ok(())
}

/// Mean wall time of `f` over `n` synchronised runs, after one warm-up run.
fn time_ms(dev: &Device, n: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..n {
        f()?;
    }
    dev.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() * 1e3 / n as f64)
}

#[test]
fn flash_attention_timing() -> Result<()> {
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    // klein 4B at 1024²: 512 text + 4096 image tokens, 24 heads of 128.
    let (b, h, s, d) = (1, 24, 4608, 128);
    let scale = 1.0 / (d as f32).sqrt();
    let q = rand(&dev, [b, h, s, d], DType::BF16, 1.0)?;
    let k = rand(&dev, [b, h, s, d], DType::BF16, 1.0)?;
    let v = rand(&dev, [b, h, s, d], DType::BF16, 1.0)?;
    let flops = 4.0 * (b * h * s * s * d) as f64;
    let n = 20;
    let (bhsd, bshd) = (
        unmasked(scale, AttnLayout::Bhsd),
        unmasked(scale, AttnLayout::Bshd),
    );
    let t_flash = time_ms(&dev, n, || flash_attention(&q, &k, &v, &bhsd))?;
    let t_naive = time_ms(&dev, n, || naive_attention(&q, &k, &v, scale))?;
    // The same in [B, S, H, D] (the projections' layout): fused vs transposes + naive.
    let qt = q.transpose(1, 2)?.contiguous()?;
    let kt = k.transpose(1, 2)?.contiguous()?;
    let vt = v.transpose(1, 2)?.contiguous()?;
    let t_flash_bshd = time_ms(&dev, n, || flash_attention(&qt, &kt, &vt, &bshd))?;
    let t_naive_bshd = time_ms(&dev, n, || {
        let t = |x: &Tensor| x.transpose(1, 2)?.contiguous();
        naive_attention(&t(&qt)?, &t(&kt)?, &t(&vt)?, scale)?
            .transpose(1, 2)?
            .contiguous()
    })?;
    println!("attention B={b} H={h} S={s} D={d} bf16, mean of {n} warm synchronised runs:");
    println!(
        "  flash  [B,H,S,D]: {t_flash:8.3} ms  ({:.0} TFLOP/s)",
        flops / t_flash / 1e9
    );
    println!(
        "  naive  [B,H,S,D]: {t_naive:8.3} ms  ({:.0} TFLOP/s)  -> speed-up {:.1}x",
        flops / t_naive / 1e9,
        t_naive / t_flash
    );
    println!(
        "  flash  [B,S,H,D]: {t_flash_bshd:8.3} ms  ({:.0} TFLOP/s)",
        flops / t_flash_bshd / 1e9
    );
    println!(
        "  naive  [B,S,H,D] (with transposes): {t_naive_bshd:8.3} ms  -> speed-up {:.1}x",
        t_naive_bshd / t_flash_bshd
    );
    println!("  (PyTorch SDPA/flash on an H100: ~1 ms for this shape)");
    let err = max_abs_diff(
        &flash_attention(&q, &k, &v, &bhsd)?,
        &naive_attention(
            &q.to_dtype(DType::F32)?,
            &k.to_dtype(DType::F32)?,
            &v.to_dtype(DType::F32)?,
            scale,
        )?,
    )?;
    println!("  flash max abs err vs f32 naive: {err:.3e}");
    assert!(
        err < 1e-2,
        "flash attention error {err} on the timing shape"
    );
    Ok(())
}
