//! Peak device memory, for `-v` and `bench`, and the CUDA pool's release policy.
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
        return cuda::pool_attribute(dev, false);
    }
    let _ = device;
    None
}

/// Starts a new peak measurement.
pub fn reset_peak(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        let _ = cuda::pool_attribute(dev, true);
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
        cuda::set_release_threshold(dev, u64::MAX);
    }
    let _ = device;
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::CudaDevice;

    /// The device's default memory pool (the one candle's `cuMemAllocAsync` draws from), with
    /// the device's context bound to this thread for the calls that follow.
    fn default_pool(dev: &CudaDevice) -> Option<sys::CUmemoryPool> {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a plain driver query on a valid device handle with an out-pointer we own.
        let ok = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        (ok == sys::CUresult::CUDA_SUCCESS).then_some(pool)
    }

    /// Sets the default pool's `RELEASE_THRESHOLD` (bytes kept across synchronisations); a
    /// failure leaves the driver's default in place.
    pub fn set_release_threshold(dev: &CudaDevice, bytes: u64) {
        if let Some(pool) = default_pool(dev) {
            let mut value = bytes;
            let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
            // SAFETY: a valid pool handle and a u64 the attribute expects.
            let _ =
                unsafe { sys::cuMemPoolSetAttribute(pool, attr, &mut value as *mut u64 as *mut _) };
        }
    }

    /// Reads (or, with `reset`, zeroes) the default pool's `USED_MEM_HIGH` attribute.
    pub fn pool_attribute(dev: &CudaDevice, reset: bool) -> Option<u64> {
        let pool = default_pool(dev)?;
        let mut value: u64 = 0;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: a valid pool handle and a u64 the attribute expects.
        let ok = unsafe {
            if reset {
                sys::cuMemPoolSetAttribute(pool, attr, &mut value as *mut u64 as *mut _)
            } else {
                sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut _)
            }
        };
        (ok == sys::CUresult::CUDA_SUCCESS).then_some(value)
    }
}
