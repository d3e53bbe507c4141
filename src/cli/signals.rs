//! SIGINT and SIGTERM during `generate`: the first one asks the pipeline to stop at its next
//! safe point (between denoising steps or images, `flux2_klein::pipeline::Cancel`), so the
//! images already written stay, no temp file is left behind and the run exits 130 / 143 with
//! "interrupted after k of n images". A second signal ends the process at once (with the
//! same status; a temp file it leaves is removed by the next run over the same output).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use flux2_klein::pipeline::Cancel;

/// The flag the handler stores the signal number into (shared with the pipeline's token).
static FLAG: OnceLock<Arc<AtomicUsize>> = OnceLock::new();

/// Installs the handlers (once per process) and returns the token they set.
pub fn install() -> Cancel {
    let flag = FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicUsize::new(0));
        #[cfg(unix)]
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: `on_signal` only does async-signal-safe work (an atomic swap, `_exit`);
            // the sigaction struct is fully initialised.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
        flag
    });
    Cancel::from_flag(flag.clone())
}

#[cfg(unix)]
extern "C" fn on_signal(signal: libc::c_int) {
    if let Some(flag) = FLAG.get() {
        if flag.swap(signal as usize, Ordering::SeqCst) == 0 {
            return;
        }
    }
    // SAFETY: `_exit` is async-signal-safe; a second signal means "stop now".
    unsafe { libc::_exit(128 + signal) }
}

/// The exit status of a run stopped by `signal` (130 for SIGINT, 143 for SIGTERM).
pub fn exit_status(signal: usize) -> u8 {
    u8::try_from(128 + signal.min(127)).unwrap_or(1)
}
