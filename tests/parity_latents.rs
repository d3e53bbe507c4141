//! Parity of the latent layout and batch norm with diffusers 0.42.1's `Flux2KleinPipeline`:
//! the index rules of `_patchify_latents` / `_unpatchify_latents` and `_pack_latents` /
//! `_unpack_latents_with_ids`, the position ids of `_prepare_latent_ids` / `_prepare_image_ids`
//! / `_prepare_text_ids` (golden rows of spec §9), and the VAE batch-norm (de)normalisation of
//! `_encode_vae_image` and of the decode path of `__call__`, computed by torch 2.15 on the tiny
//! models' statistics. Every check is **bit-exact**, except f32 batch norm with our correctly
//! rounded `std` (torch's CPU `sqrt` is not): <= 1 ulp in `std`, 1e-6 in the result.
//!
//! Sources of truth: `tests/fixtures/foundation/bn.json` (written by
//! `reference/foundation_fixtures.py`) and spec §9. The same functions on the refcheck cases
//! are checked in `parity_cases.rs`.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::foundation::{assert_bits_eq, foundation_json, tensor_bits, torch_std, u32s};
use flux2_klein::latents::{
    batch_ids, bn_denormalize, bn_normalize, image_ids, pack, patchify, reference_ids,
    reference_time, text_ids, unpack, unpatchify, BnStats,
};

const CPU: Device = Device::Cpu;

#[test]
fn layout_round_trips_and_ids() {
    let x = Tensor::arange(0f32, (2 * 8 * 6 * 10) as f32, &CPU)
        .unwrap()
        .reshape((2, 8, 6, 10))
        .unwrap();
    // patchify channel rule: out[b, 4c+2dy+dx, y, x] = in[b, c, 2y+dy, 2x+dx].
    let p = patchify(&x).unwrap();
    assert_eq!(p.dims(), &[2, 32, 3, 5]);
    for (c, dy, dx, y, xx) in [
        (0, 0, 0, 0, 0),
        (3, 1, 0, 2, 4),
        (7, 1, 1, 1, 3),
        (5, 0, 1, 2, 0),
    ] {
        let a = p
            .i((1, 4 * c + 2 * dy + dx, y, xx))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let b = x
            .i((1, c, 2 * y + dy, 2 * xx + dx))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(a, b);
    }
    assert_bits_eq("unpatchify(patchify(x))", &unpatchify(&p).unwrap(), &x);
    // pack: token y*w+x, channel k.
    let packed = pack(&p).unwrap();
    assert_eq!(packed.dims(), &[2, 15, 32]);
    assert_eq!(
        packed
            .i((1, 2 * 5 + 3, 9))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        p.i((1, 9, 2, 3)).unwrap().to_scalar::<f32>().unwrap()
    );
    assert_bits_eq("unpack(pack(x))", &unpack(&packed, 3, 5).unwrap(), &p);
    assert!(unpack(&packed, 4, 4).is_err());
    assert!(patchify(&Tensor::zeros((1, 4, 3, 4), DType::F32, &CPU).unwrap()).is_err());

    // §9: img_ids rows for 1024² and txt_ids.
    let ids = image_ids(0, 64, 64, &CPU)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    assert_eq!(ids.len(), 4096);
    assert_eq!(
        (
            ids[0].clone(),
            ids[1].clone(),
            ids[64].clone(),
            ids[4095].clone()
        ),
        (
            vec![0, 0, 0, 0],
            vec![0, 0, 1, 0],
            vec![0, 1, 0, 0],
            vec![0, 63, 63, 0]
        )
    );
    let t = text_ids(512, &CPU).unwrap().to_vec2::<i64>().unwrap();
    assert_eq!(
        (t[0].clone(), t[511].clone()),
        (vec![0, 0, 0, 0], vec![0, 0, 0, 511])
    );
    assert_eq!(
        (reference_time(0), reference_time(1), reference_time(2)),
        (10, 20, 30)
    );
    // §9: two references at 1024² (grids 50×37 and 52×78).
    let r = reference_ids(&[(50, 37), (52, 78)], &CPU)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    assert_eq!(r.len(), 1850 + 4056);
    assert_eq!(
        (
            r[0].clone(),
            r[1849].clone(),
            r[1850].clone(),
            r[5905].clone()
        ),
        (
            vec![10, 0, 0, 0],
            vec![10, 49, 36, 0],
            vec![20, 0, 0, 0],
            vec![20, 51, 77, 0]
        )
    );
    assert_eq!(
        batch_ids(&image_ids(0, 2, 3, &CPU).unwrap(), 3)
            .unwrap()
            .dims(),
        &[3, 6, 4]
    );
}

#[test]
fn bn_matches_torch_fixture() {
    let fx = foundation_json("bn.json");
    for e in fx["cases"].as_array().unwrap() {
        let model = e["model"].as_str().unwrap();
        let dtype = if e["dtype"] == "bf16" {
            DType::BF16
        } else {
            DType::F32
        };
        let what = format!("bn {model} {dtype:?}");
        let dir = common::model(model).join("vae");
        let st =
            candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &CPU)
                .unwrap();
        let (rm, rv) = (
            st["bn.running_mean"].to_dtype(dtype).unwrap(),
            st["bn.running_var"].to_dtype(dtype).unwrap(),
        );
        let eps = e["eps"].as_f64().unwrap();
        let shape: Vec<usize> = common::json_uints(&e["shape"]);
        let from_bits = |k: &str| {
            let v: Vec<f32> = u32s(&e[k]).into_iter().map(f32::from_bits).collect();
            Tensor::from_vec(v, shape.as_slice(), &CPU)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let z = from_bits("z_bits");
        let ours = BnStats::new(&rm, &rv, eps, dtype).unwrap();
        let tstd = torch_std(model, dtype);
        let ulps = max_ulps(&ours.std.flatten_all().unwrap(), &tstd);
        let differing = tensor_bits(&ours.std)
            .iter()
            .zip(tensor_bits(&tstd))
            .filter(|(a, b)| **a != *b)
            .count();
        eprintln!(
            "{what}: std: {differing} of {} channels differ from torch CPU, max {ulps} ulp",
            tstd.elem_count()
        );
        if dtype == DType::BF16 {
            assert_eq!(differing, 0, "{what}: bf16 std must be bit-exact");
        } else {
            assert!(ulps <= 1, "{what}: std more than 1 ulp from torch");
        }
        let torch_stats = BnStats::from_parts(&rm, &tstd, dtype).unwrap();
        assert_bits_eq(
            &format!("{what}: normalize (torch std)"),
            &torch_stats.normalize(&z).unwrap(),
            &from_bits("normalized_bits"),
        );
        assert_bits_eq(
            &format!("{what}: denormalize (torch std)"),
            &torch_stats.denormalize(&z).unwrap(),
            &from_bits("denormalized_bits"),
        );
        let n = bn_normalize(&z, &rm, &rv, eps).unwrap();
        let d = bn_denormalize(&z, &rm, &rv, eps).unwrap();
        if dtype == DType::BF16 {
            assert_bits_eq(
                &format!("{what}: normalize"),
                &n,
                &from_bits("normalized_bits"),
            );
            assert_bits_eq(
                &format!("{what}: denormalize"),
                &d,
                &from_bits("denormalized_bits"),
            );
        } else {
            common::assert_close(
                &format!("{what}: normalize"),
                &n,
                &from_bits("normalized_bits"),
                1e-6,
            );
            common::assert_close(
                &format!("{what}: denormalize"),
                &d,
                &from_bits("denormalized_bits"),
                1e-6,
            );
        }
    }
}

/// Max distance in ulps between two f32-valued tensors of the same dtype.
fn max_ulps(a: &Tensor, b: &Tensor) -> i64 {
    let to_i = |t: &Tensor| -> Vec<i64> {
        match t.dtype() {
            DType::BF16 => t
                .flatten_all()
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits() as i16 as i64)
                .collect(),
            _ => tensor_bits(t)
                .into_iter()
                .map(|x| x as i32 as i64)
                .collect(),
        }
    };
    to_i(a)
        .iter()
        .zip(to_i(b))
        .map(|(x, y)| (x - y).abs())
        .max()
        .unwrap_or(0)
}
