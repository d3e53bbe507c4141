//! Stopping a running batch from outside: a [`Cancel`] token in [`super::PipelineOptions`],
//! checked by the batch loop at its safe points (before each stage of each image, after each
//! denoising step, between images). A cancelled batch ends with a [`Cancelled`] error; the
//! images handed to `on_image` before it are complete (front ends keep them).
//!
//! The library installs no signal handler: a front end sets the token, e.g. from one (storing
//! into an atomic is async-signal-safe).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A shared cancellation request: 0 = run on; any other value = stop at the next safe point,
/// the value being the caller's reason (the CLI stores the signal number).
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicUsize>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    /// A token over an existing flag (e.g. one a signal handler stores into).
    pub fn from_flag(flag: Arc<AtomicUsize>) -> Self {
        Self(flag)
    }

    /// Asks the batch to stop; `reason` must be non-zero (0 is taken as 1).
    pub fn cancel(&self, reason: usize) {
        self.0.store(reason.max(1), Ordering::SeqCst);
    }

    /// The reason given to [`Self::cancel`], once cancelled.
    pub fn reason(&self) -> Option<usize> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            r => Some(r),
        }
    }

    /// `Err(Cancelled)` (counts filled in by the batch) once cancelled.
    pub(super) fn check(&self) -> anyhow::Result<()> {
        match self.reason() {
            None => Ok(()),
            Some(reason) => Err(Cancelled {
                finished: 0,
                total: 0,
                reason,
            }
            .into()),
        }
    }
}

/// The error of a cancelled batch: `finished` of its `total` images were delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted after {finished} of {total} images")]
pub struct Cancelled {
    pub finished: usize,
    pub total: usize,
    /// The value given to [`Cancel::cancel`].
    pub reason: usize,
}
