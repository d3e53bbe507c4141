//! Opt-in region timing to see where device time goes: with `PipelineOptions::profile` (the
//! CLI sets it from `FLUX2_KLEIN_PROFILE=1`) the device is synchronised around named regions
//! and each batch ends with the table as `Event::Profile`. Off (the default) it costs one
//! relaxed load per region and changes nothing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::Device;

static STATE: AtomicU8 = AtomicU8::new(0); // 0 never set, 1 off, 2 on
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// Whether profiling is on ([`set_enabled`]; off by default).
pub fn enabled() -> bool {
    STATE.load(Ordering::Relaxed) == 2
}

/// Turns profiling on or off for the process (the pipeline does this from
/// `PipelineOptions::profile`).
pub fn set_enabled(on: bool) {
    STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Runs `f`, and when profiling is on adds its synchronised wall time to `name`.
pub fn span<T, E>(
    name: &'static str,
    device: &Device,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    if !enabled() {
        return f();
    }
    let _ = device.synchronize();
    let t = Instant::now();
    let out = f();
    let _ = device.synchronize();
    let d = t.elapsed();
    if let Ok(mut m) = TOTALS.lock() {
        let e = m.entry(name).or_default();
        e.0 += d;
        e.1 += 1;
    }
    out
}

/// The accumulated table (and resets it); `None` when profiling is off or nothing ran.
pub fn take_report() -> Option<String> {
    if !enabled() {
        return None;
    }
    let mut m = TOTALS.lock().ok()?;
    if m.is_empty() {
        return None;
    }
    let mut s = String::from("profile (synchronised regions; nested regions overlap):\n");
    for (name, (d, n)) in m.iter() {
        s += &format!(
            "  {name:<28} {:>10.2} ms  {n:>6} calls  {:>8.3} ms/call\n",
            d.as_secs_f64() * 1e3,
            d.as_secs_f64() * 1e3 / *n as f64
        );
    }
    m.clear();
    Some(s)
}
