//! `--device` / `--dtype` / `--vae-dtype` / `--vae-tile` → `PipelineOptions`.

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device};
use flux2_klein::ops::KernelOptions;
use flux2_klein::pipeline::PipelineOptions;

use flux2_klein::weights::Quantization;

use super::args::{DTypeArg, DeviceArg, ModelArgs, QuantizeArg};

/// The pipeline options for the model arguments. Fails (before any weights load) when CUDA is
/// asked for and this build or machine cannot provide it.
pub fn pipeline_options(args: &ModelArgs, keep_resident: bool) -> Result<PipelineOptions> {
    let device = resolve_device(args.device)?;
    // Spec §1: the reference pipeline runs in bf16; on CPU f32 is the default because candle's
    // CPU bf16 kernels are slow and f32 matches diffusers' f32 run to ~1e-5.
    let mut options = PipelineOptions::for_device(device);
    if let Some(d) = args.dtype {
        options.dtype = to_dtype(d);
    }
    options.vae_dtype = args.vae_dtype.map(to_dtype);
    options.keep_resident = keep_resident;
    options.vae_tile = args.vae_tile.map(|t| t as usize);
    options.quantize = args.quantize.map(|QuantizeArg::Fp8| Quantization::Fp8);
    options.transformer_file = args
        .transformer
        .as_deref()
        .map(flux2_klein::weights::resolve::transformer_file)
        .transpose()?;
    // The library reads no environment: its kernel switches and profiling come from here.
    options.kernels = KernelOptions::from_env(&mut |w| super::log_line(&format!("warning: {w}")));
    options.profile = std::env::var("FLUX2_KLEIN_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
    check_bf16_support(&options)?;
    Ok(options)
}

/// bf16 on CUDA needs compute capability 8.0 (candle's bf16 kernels and ours are built for
/// Ampere and newer): on an older GPU say so before any weights load, instead of failing at
/// the first kernel launch with a missing-kernel error.
fn check_bf16_support(options: &PipelineOptions) -> Result<()> {
    let uses_bf16 = options.dtype == DType::BF16 || options.vae_dtype == Some(DType::BF16);
    if !uses_bf16 {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = &options.device {
        if let Ok(cc) = dev.cuda_stream().context().compute_capability() {
            if let Some(msg) = bf16_unsupported(cc) {
                bail!("{msg}");
            }
        }
    }
    Ok(())
}

/// The error for bf16 on a GPU of compute capability `cc`, if it has no bf16 support.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn bf16_unsupported(cc: (i32, i32)) -> Option<String> {
    (cc.0 < 8).then(|| {
        format!(
            "this GPU (compute capability {}.{}) cannot compute in bf16, which needs 8.0 or newer \
             (Ampere, Ada, Hopper) — run with --dtype f32 (about twice the GPU memory), or on \
             another GPU with --device cuda:N",
            cc.0, cc.1
        )
    })
}

fn to_dtype(d: DTypeArg) -> DType {
    match d {
        DTypeArg::Bf16 => DType::BF16,
        DTypeArg::F32 => DType::F32,
    }
}

/// Short human name of a device ("cpu", "cuda:0").
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F16 => "f16",
        _ => "other",
    }
}

fn resolve_device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda(n) => {
            if !cfg!(feature = "cuda") {
                // Not "--device {arg}": `gpu` would come back as `cuda:0`.
                bail!(
                    "--device asks for a CUDA GPU, but this flux2-klein was built without CUDA \
                     support — rebuild with `cargo build --release --features cuda`, or use \
                     --device cpu"
                );
            }
            open_cuda(n).map_err(|e| {
                anyhow!(
                    "cannot open CUDA device {n} ({e}) — check `nvidia-smi` and the driver, pick \
                     another GPU with --device cuda:N, or use --device cpu"
                )
            })
        }
        DeviceArg::Auto => {
            if cfg!(feature = "cuda") {
                if let Ok(d) = open_cuda(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
    }
}

/// `Device::new_cuda`, with a panic inside the driver loader (no libcuda) turned into an error.
fn open_cuda(n: usize) -> Result<Device> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| Device::new_cuda(n));
    std::panic::set_hook(previous);
    match result {
        Ok(r) => Ok(r?),
        Err(p) => {
            let msg = super::panic_message(&*p)
                .unwrap_or_else(|| "the CUDA driver could not be loaded".into());
            bail!("{msg}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bf16_unsupported;

    #[test]
    fn bf16_needs_ampere_or_newer() {
        for cc in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)] {
            assert_eq!(bf16_unsupported(cc), None, "{cc:?}");
        }
        for cc in [(7, 5), (7, 0), (6, 1)] {
            let msg = bf16_unsupported(cc).expect("an error");
            assert!(msg.contains(&format!("{}.{}", cc.0, cc.1)) && msg.contains("--dtype f32"));
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
    }
}
