//! Run-time compilation of our CUDA sources with NVRTC, cached in memory per process and on
//! disk (`$XDG_CACHE_HOME` or `~/.cache`, under `flux2-klein/`), keyed by a hash of the source
//! and the options, so later processes skip the compile (cold start).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::CudaFunction;
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, Result};

/// PTX for `source` compiled with `options` (`name` only labels errors and cache files).
pub fn ptx(name: &str, source: &'static str, options: Vec<String>) -> Result<String> {
    static CACHE: OnceLock<Mutex<HashMap<u64, String>>> = OnceLock::new();
    let key = fnv1a(source.bytes().chain(options.join(" ").bytes()));
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache
        .lock()
        .map_err(|_| candle_core::Error::Msg("NVRTC cache poisoned".into()))?;
    if let Some(ptx) = cache.get(&key) {
        return Ok(ptx.clone());
    }
    let disk = disk_cache_path(name, key);
    if let Some(ptx) = disk.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        cache.insert(key, ptx.clone());
        return Ok(ptx);
    }
    let ptx = compile(name, source, &options)?;
    if let Some(path) = disk {
        // Best effort: temp name then rename, so concurrent processes never read half a file.
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &ptx).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
    }
    cache.insert(key, ptx.clone());
    Ok(ptx)
}

fn fnv1a(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes.chain(env!("CARGO_PKG_VERSION").bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn disk_cache_path(name: &str, key: u64) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(
        base.join("flux2-klein")
            .join(format!("{name}-{key:016x}.ptx")),
    )
}

/// Compiles `source` for `compute_{arch}` (e.g. `90`, `90a`) with `defines`, bypassing both caches, and checks
/// that the PTX defines every kernel in `entries`. Needs NVRTC but no GPU, so a machine that
/// only builds the `cuda` binary can still catch a source that would fail at run time.
pub fn check_compiles(
    name: &str,
    source: &str,
    arch: &str,
    defines: &[String],
    entries: &[String],
) -> Result<()> {
    let mut options = vec![format!("--gpu-architecture=compute_{arch}")];
    options.extend(defines.iter().cloned());
    let ptx = compile(name, source, &options)?;
    let missing: Vec<&String> = entries
        .iter()
        .filter(|e| !ptx.contains(&format!(".entry {e}(")))
        .collect();
    if !missing.is_empty() {
        candle_core::bail!("{name}.cu with {options:?} does not define the kernels {missing:?}")
    }
    Ok(())
}

/// PTX for `source`, compiled now (no cache).
fn compile(name: &str, source: &str, options: &[String]) -> Result<String> {
    let opts = CompileOptions {
        options: options.to_vec(),
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(source, opts).map_err(|e| compile_error(name, options, e))?;
    Ok(ptx.to_src())
}

fn compile_error(
    name: &str,
    options: &[String],
    e: candle_core::cuda_backend::cudarc::nvrtc::CompileError,
) -> candle_core::Error {
    let detail = match &e {
        candle_core::cuda_backend::cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            log.to_string_lossy().into_owned()
        }
        other => format!("{other:?}"),
    };
    candle_core::Error::Msg(format!(
        "NVRTC failed to compile {name}.cu with {options:?} (is libnvrtc.so.13 with \
         libnvrtc-builtins.so.13.0 on LD_LIBRARY_PATH?): {detail}"
    ))
}

/// Kernel `function` of `source`, compiled for `dev`'s architecture with `defines` (e.g.
/// `-DFA_ONLY_D=128`) and loaded through candle's per-device module cache. The PTX targets the
/// virtual architecture `compute_XY`: candle's module loader takes PTX and the driver
/// JIT-compiles it once.
pub fn load_function(
    dev: &CudaDevice,
    name: &str,
    source: &'static str,
    defines: &[String],
    function: &str,
) -> Result<CudaFunction> {
    load_function_arch(dev, name, source, defines, function, "")
}

/// [`load_function`] for the architecture-specific target `compute_XY{suffix}` (`"a"`: the
/// sm_90a instructions such as wgmma, which run only on that exact architecture).
pub fn load_function_arch(
    dev: &CudaDevice,
    name: &str,
    source: &'static str,
    defines: &[String],
    function: &str,
    suffix: &str,
) -> Result<CudaFunction> {
    let (major, minor) = dev.cuda_stream().context().compute_capability().w()?;
    let mut options = vec![format!("--gpu-architecture=compute_{major}{minor}{suffix}")];
    options.extend(defines.iter().cloned());
    let ptx = ptx(name, source, options)?;
    let module = format!(
        "flux2_{name}_sm{major}{minor}{suffix}_{}",
        defines.join("_")
    );
    Ok(dev
        .get_or_load_custom_func(function, &module, &ptx)?
        .into_cuda_function())
}
