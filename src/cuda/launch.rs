//! What every launch of our kernels shares: typed views of candle's CUDA storage, the output
//! buffer, the launch with its argument list, the fused kernels' grids (their block geometry
//! read from `kernels/fused.cu`, the one definition), and the `cpu_fwd` of a CUDA-only
//! custom op.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result};

/// The `cpu_fwd` of a CUDA-only `CustomOp1/2/3` (the first argument: its inputs): the error
/// `$msg`, which may use the receiver `$s` (pass `self`). Callers run candle's ops on the CPU
/// and never reach it.
macro_rules! cuda_only_cpu_fwd {
    (1, $s:ident, $msg:expr) => {
        fn cpu_fwd(
            &$s,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{}", $msg)
        }
    };
    (2, $s:ident, $msg:expr) => {
        fn cpu_fwd(
            &$s,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{}", $msg)
        }
    };
    (3, $s:ident, $msg:expr) => {
        fn cpu_fwd(
            &$s,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{}", $msg)
        }
    };
}
pub(crate) use cuda_only_cpu_fwd;

// ---------------------------------------------------------------- buffers

/// The elements of `s` from `l`'s start offset on, as `T` (an error if `s` holds another dtype).
pub(crate) fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// A device buffer of `n` `T`s for a kernel to write, not initialised.
///
/// # Safety
///
/// The kernel launched on it must write every element before anything reads it.
pub(crate) unsafe fn uninit<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the caller's contract.
    unsafe { dev.alloc::<T>(n) }
}

/// A kernel's output buffer as candle storage on `dev`.
pub(crate) fn wrap<T: CudaDType>(out: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    T::wrap_cuda_slice(out, dev.clone())
}

// ---------------------------------------------------------------- the launch

/// One kernel argument: a device buffer (slice or view) or a scalar, pushed by reference.
pub(crate) trait KernelArg {
    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>);
}

impl<T> KernelArg for CudaSlice<T> {
    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>) {
        args.arg(self);
    }
}

impl<T> KernelArg for CudaView<'_, T> {
    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>) {
        args.arg(self);
    }
}

macro_rules! scalar_kernel_args {
    ($($t:ty),*) => {
        $(impl KernelArg for $t {
            fn push<'a>(&'a self, args: &mut LaunchArgs<'a>) {
                args.arg(self);
            }
        })*
    };
}
scalar_kernel_args!(i32, i64, f32);

/// Queues `func` on `dev`'s stream with the grid `cfg` and `args` in the order of the kernel's
/// parameters (each borrowed for the call only: the driver copies the values at the launch).
///
/// # Safety
///
/// `args` must match the kernel's parameter list in number, order and types, `cfg` must be
/// the geometry the kernel is written for, and every buffer must hold what the kernel reads
/// and writes over that grid.
pub(crate) unsafe fn launch(
    dev: &CudaDevice,
    func: &CudaFunction,
    cfg: LaunchConfig,
    args: &[&dyn KernelArg],
) -> Result<()> {
    let stream = dev.cuda_stream();
    let mut builder = stream.launch_builder(func);
    for arg in args {
        arg.push(&mut builder);
    }
    // SAFETY: the caller's contract.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

// ---------------------------------------------------------------- the fused kernels' grids

/// The value of the line `#define NAME <integer>` in `source`, evaluated at compile time: a
/// missing or non-integer define fails the build.
pub(crate) const fn source_define(source: &str, name: &str) -> usize {
    const DEFINE: &[u8] = b"#define ";
    let (s, n) = (source.as_bytes(), name.as_bytes());
    let mut line = 0;
    while line < s.len() {
        let mut at = line;
        if starts_with_at(s, at, DEFINE) && starts_with_at(s, at + DEFINE.len(), n) {
            at += DEFINE.len() + n.len();
            if at < s.len() && s[at] == b' ' {
                while at < s.len() && s[at] == b' ' {
                    at += 1;
                }
                let (mut value, start) = (0usize, at);
                while at < s.len() && s[at].is_ascii_digit() {
                    value = value * 10 + (s[at] - b'0') as usize;
                    at += 1;
                }
                if at == start || (at < s.len() && !s[at].is_ascii_whitespace()) {
                    panic!("the #define is not a plain decimal integer");
                }
                return value;
            }
        }
        // The next line.
        while line < s.len() && s[line] != b'\n' {
            line += 1;
        }
        line += 1;
    }
    panic!("#define not found in the kernel source")
}

const fn starts_with_at(s: &[u8], at: usize, prefix: &[u8]) -> bool {
    if at + prefix.len() > s.len() {
        return false;
    }
    let mut i = 0;
    while i < prefix.len() {
        if s[at + i] != prefix[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Threads per block of every fused kernel (`FUSED_THREADS`).
pub(crate) const THREADS: u32 = source_define(super::fused::KERNEL_SOURCE, "FUSED_THREADS") as u32;

/// Warps per block of the one-warp-per-row kernels (`FUSED_WARPS_PER_BLOCK`).
const WARPS_PER_BLOCK: usize = source_define(super::fused::KERNEL_SOURCE, "FUSED_WARPS_PER_BLOCK");

/// A grid-stride launch over `n` work items, one per thread (at most 2²⁰ blocks).
pub(crate) fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One thread block per row (the row-wise kernels: `blockIdx.x` is the row).
pub(crate) fn grid_rows(rows: usize) -> Result<LaunchConfig> {
    if rows == 0 || rows > i32::MAX as usize {
        bail!("fused kernel: {rows} rows do not fit one launch")
    }
    Ok(LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One warp per row (the row-wise kernels over short rows: `rmsnorm_rope`, `rmsnorm_scale`;
/// row = blockIdx.x · warps per block + warp).
pub(crate) fn grid_warp_rows(rows: usize) -> Result<LaunchConfig> {
    let blocks = rows.div_ceil(WARPS_PER_BLOCK);
    if blocks > i32::MAX as usize {
        bail!("fused kernel: {rows} rows do not fit one launch")
    }
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: ((WARPS_PER_BLOCK * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The per-(batch, channel)-plane kernels (`gn_apply_bf16`, `channel_bias_bf16`): about four
/// elements per thread along x, one plane per y.
pub(crate) fn grid_planes(planes: usize, hw: usize) -> Result<LaunchConfig> {
    if planes == 0 || planes > 65535 {
        bail!("fused kernel: {planes} (batch, channel) planes exceed one launch's grid")
    }
    let per_plane = hw.div_ceil(THREADS as usize * 4).clamp(1, 1 << 16) as u32;
    Ok(LaunchConfig {
        grid_dim: (per_plane, planes as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::source_define;

    #[test]
    fn reads_a_define_on_its_own_line() {
        let src = "// #define A 1\n#define AB 7\n#define A  42 // note\n#define B 3";
        assert_eq!(source_define(src, "A"), 42);
        assert_eq!(source_define(src, "AB"), 7);
        assert_eq!(source_define(src, "B"), 3);
    }

    /// gn_partial_bf16's shared arrays hold one value per thread of the block we launch.
    #[test]
    fn group_norm_block_is_the_launch_block() {
        assert!(super::super::fused::KERNEL_SOURCE.contains("#define GN_THREADS FUSED_THREADS"));
    }
}
