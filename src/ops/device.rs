//! Peak device memory, for `-v` and `bench`, and the CUDA pool's release policy (the CUDA
//! side is `crate::cuda::memory`).
//!
//! candle's CUDA backend allocates through cudarc's stream-ordered allocator
//! (`cuMemAllocAsync`), i.e. from the device's default memory pool, so the pool's
//! `USED_MEM_HIGH` watermark is the peak of live tensor memory — the same quantity as
//! PyTorch's `torch.cuda.max_memory_allocated()` that diffusers' numbers use. Other devices
//! report nothing.

use candle_core::Device;

/// Peak bytes of device memory in use since the last [`reset_peak`], where the device can tell.
pub fn peak(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return crate::cuda::memory::pool_attribute(dev, false);
    }
    let _ = device;
    None
}

/// Bytes of memory the device can still give this process, where it can tell: on the CPU
/// (Linux) `MemAvailable` plus `SwapFree` from `/proc/meminfo`; on CUDA the free device
/// memory plus what our memory pool holds unused. `None` elsewhere (no check is made).
pub fn available(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return crate::cuda::memory::available(dev);
    }
    match device {
        Device::Cpu => cpu_available(&std::fs::read_to_string("/proc/meminfo").ok()?),
        _ => None,
    }
}

/// `MemAvailable + SwapFree` of a `/proc/meminfo` text, in bytes.
fn cpu_available(meminfo: &str) -> Option<u64> {
    let field = |name: &str| {
        meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
            Some(kib.saturating_mul(1024))
        })
    };
    Some(field("MemAvailable")?.saturating_add(field("SwapFree").unwrap_or(0)))
}

/// Starts a new peak measurement.
pub fn reset_peak(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        let _ = crate::cuda::memory::pool_attribute(dev, true);
    }
    let _ = device;
}

/// Makes the CUDA device's default memory pool keep freed memory for reuse instead of handing
/// it back to the driver at every synchronisation. The pool's release threshold defaults to
/// 0, so each `synchronize` (the pipeline takes one per denoising step and stage) unmaps every
/// freed block, and the next step maps its activations again; PyTorch's caching allocator,
/// which diffusers runs on, keeps them. Peak *used* memory (what [`peak`] and the bars
/// count) is unchanged; the pool's reservation stays at its high-water mark, as torch's does.
pub fn keep_freed_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        crate::cuda::memory::set_release_threshold(dev, u64::MAX);
    }
    let _ = device;
}

#[cfg(test)]
mod tests {
    #[test]
    fn meminfo() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:    2000000 kB\nSwapFree:  1000 kB\n";
        assert_eq!(super::cpu_available(text), Some(2_001_000 * 1024));
        assert_eq!(super::cpu_available("MemTotal: 1 kB\n"), None);
    }
}
