//! KV-cache checkpoints in a batch: the reference K/V of a set of references is computed
//! once (the [`Stage::ReferenceKv`] stage) and reused by the requests that follow with the
//! same references, then dropped when the next request has other references or none follows
//! (they are large: 2 × blocks × R × D values, ~4 GB for two 1024² references on 9B).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use candle_core::Tensor;

use super::components::StageTimer;
use super::stages;
use super::{Event, Pipeline, Request, Stage};
use crate::transformer::{Flux2Transformer, ReferenceKv};

/// Whether two requests have the same references (the same shared images, in order).
pub(super) fn same_references(a: &Request, b: &Request) -> bool {
    a.references.len() == b.references.len()
        && a.references
            .iter()
            .zip(&b.references)
            .all(|(x, y)| Arc::ptr_eq(&x.image, &y.image))
}

/// The K/V of the last set of prepared references (recognised by the identity of their
/// shared `Arc`).
#[derive(Default)]
pub(super) struct KvReuse {
    entry: Option<(Arc<Vec<image::RgbImage>>, Arc<ReferenceKv>)>,
}

impl KvReuse {
    /// The K/V of `references` (packed tokens and ids `image_latents`): the kept ones if they
    /// are of the same references, else computed as the [`Stage::ReferenceKv`] stage (its
    /// time in `took`).
    pub(super) fn get_or_compute(
        &mut self,
        pipeline: &Pipeline,
        transformer: &Flux2Transformer,
        references: &Arc<Vec<image::RgbImage>>,
        image_latents: &(Tensor, Tensor),
        took: &mut Duration,
        events: &mut dyn FnMut(Event),
    ) -> Result<Arc<ReferenceKv>> {
        if let Some((images, kv)) = &self.entry {
            if Arc::ptr_eq(images, references) {
                return Ok(kv.clone());
            }
        }
        // The previous set's K/V go before the new ones are made (peak memory).
        self.entry = None;
        let timer = StageTimer::start(events, Stage::ReferenceKv);
        let kv = stages::reference_kv(transformer, (&image_latents.0, &image_latents.1))?;
        pipeline.options.device.synchronize()?;
        *took = timer.end(events);
        let kv = Arc::new(kv);
        self.entry = Some((references.clone(), kv.clone()));
        Ok(kv)
    }

    /// Drops the kept K/V.
    pub(super) fn clear(&mut self) {
        self.entry = None;
    }
}
