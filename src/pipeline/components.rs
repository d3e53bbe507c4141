//! The components of a pipeline as the batch scheduler handles them: each one loaded when a
//! stage first needs it (as its own stage, timed) and kept in its slot of [`Pipeline`]; and
//! the timer that frames every stage with its events.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::batch::Job;
use super::{Event, Pipeline, Stage};
use crate::text_encoder::Qwen3TextEncoder;
use crate::transformer::Flux2Transformer;
use crate::vae::{AutoencoderKLFlux2, VaeParts};

/// A component and how to load it: its slot in the pipeline, the stage that loads it.
pub(super) struct Component<T> {
    slot: fn(&mut Pipeline) -> &mut Option<T>,
    stage: Stage,
    load: fn(&Pipeline) -> Result<T>,
}

pub(super) const TEXT_ENCODER: Component<Qwen3TextEncoder> = Component {
    slot: |p| &mut p.text_encoder,
    stage: Stage::LoadTextEncoder,
    load: Pipeline::load_text_encoder,
};
pub(super) const VAE_ENCODER: Component<AutoencoderKLFlux2> = Component {
    slot: |p| &mut p.vae_encoder,
    stage: Stage::LoadVaeEncoder,
    load: |p| p.load_vae(VaeParts::ENCODER),
};
pub(super) const TRANSFORMER: Component<Flux2Transformer> = Component {
    slot: |p| &mut p.transformer,
    stage: Stage::LoadTransformer,
    load: Pipeline::load_transformer,
};
pub(super) const VAE_DECODER: Component<AutoencoderKLFlux2> = Component {
    slot: |p| &mut p.vae_decoder,
    stage: Stage::LoadVaeDecoder,
    load: |p| p.load_vae(VaeParts::DECODER),
};

/// Runs `work` with `component`, loading it first (as its stage, the time added to the job's
/// `timings.load`) unless it is resident; it stays in its slot afterwards.
pub(super) fn with_component<T, R>(
    pipeline: &mut Pipeline,
    component: Component<T>,
    job: &mut Job,
    events: &mut dyn FnMut(Event),
    work: impl FnOnce(&Pipeline, &T, &mut Job, &mut dyn FnMut(Event)) -> Result<R>,
) -> Result<R> {
    let mut loaded = (component.slot)(pipeline).take();
    if loaded.is_none() {
        let timer = StageTimer::start(events, component.stage);
        loaded = Some((component.load)(pipeline)?);
        job.timings.load += timer.end(events);
    }
    let result = work(
        pipeline,
        loaded.as_ref().expect("loaded above"),
        job,
        events,
    );
    *(component.slot)(pipeline) = loaded;
    result
}

/// A running stage: [`Event::StageStart`] when it starts; [`StageTimer::end`] hands on the
/// warnings the ops queued meanwhile and sends [`Event::StageEnd`] with its wall time.
pub(super) struct StageTimer {
    stage: Stage,
    start: Instant,
}

impl StageTimer {
    pub(super) fn start(events: &mut dyn FnMut(Event), stage: Stage) -> Self {
        events(Event::StageStart(stage));
        Self {
            stage,
            start: Instant::now(),
        }
    }

    pub(super) fn end(self, events: &mut dyn FnMut(Event)) -> Duration {
        let d = self.start.elapsed();
        for w in crate::ops::take_warnings() {
            events(Event::Warning(w));
        }
        events(Event::StageEnd(self.stage, d));
        d
    }
}
