//! The CUDA default memory pool: its peak-usage watermark and its release policy (see
//! `crate::ops::device`, the device-neutral front).

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
        let _ = unsafe { sys::cuMemPoolSetAttribute(pool, attr, &mut value as *mut u64 as *mut _) };
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

/// Bytes this process can still get on the device: the driver's free memory plus what the
/// default pool holds reserved but unused (freed tensors it keeps for reuse, see
/// `set_release_threshold`).
pub fn available(dev: &CudaDevice) -> Option<u64> {
    let (free, _total) = dev.cuda_stream().context().mem_get_info().ok()?;
    let pool = default_pool(dev)?;
    let read = |attr: sys::CUmemPool_attribute| {
        let mut value: u64 = 0;
        // SAFETY: a valid pool handle and a u64 the attribute expects.
        let ok =
            unsafe { sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut _) };
        (ok == sys::CUresult::CUDA_SUCCESS).then_some(value)
    };
    let reserved = read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
    let used = read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
    Some(free as u64 + reserved.saturating_sub(used))
}
