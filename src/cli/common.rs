//! What `generate` and `bench` share: loading the pipeline, the warnings they give before
//! any work, and writing results to stdout.

use std::fmt::Display;
use std::io::Write;

use anyhow::{Context, Result};
use flux2_klein::model_dir::PipelineKind;
use flux2_klein::pipeline::{floor_to_multiple_of_16, Pipeline, PipelineOptions};

use super::args::{ModelArgs, SamplingArgs, Size};
use super::progress::Reporter;
use super::references::TRAINED_MAX_REFS;

/// Resolves the model and opens the pipeline, warning when `--guidance` will be ignored. The
/// steps and guidance stay the caller's `Option`s: the pipeline fills in its defaults.
pub fn load_pipeline(
    model: &ModelArgs,
    sampling: &SamplingArgs,
    options: PipelineOptions,
    reporter: &mut Reporter,
) -> Result<Pipeline> {
    let dir = model.source.resolve()?;
    let options = PipelineOptions {
        max_area: sampling.max_area_px(),
        ..options
    };
    let pipeline = Pipeline::open(dir, options)?;
    if let Some(guidance) = sampling.guidance {
        warn_ignored_guidance(&pipeline, guidance, reporter);
    }
    Ok(pipeline)
}

/// diffusers: "Guidance scale {g} is ignored for step-wise distilled models." (spec §8).
fn warn_ignored_guidance(pipeline: &Pipeline, guidance: f64, reporter: &mut Reporter) {
    if pipeline.is_distilled() && guidance > 1.0 {
        let what = match pipeline.kind() {
            PipelineKind::KleinKv => {
                "a KV-cache checkpoint (diffusers' Flux2KleinKVPipeline has no guidance)"
            }
            PipelineKind::Klein => {
                "a step-wise distilled model, which never runs classifier-free guidance"
            }
        };
        reporter.warn(&format!(
            "--guidance {guidance} is ignored: {} is {what}",
            pipeline.model.id
        ));
    }
}

pub fn warn_many_refs(n: usize, reporter: &mut Reporter) {
    if n > TRAINED_MAX_REFS {
        reporter.warn(&format!(
            "{n} reference images given; FLUX.2 [klein] was trained with up to \
             {TRAINED_MAX_REFS}, so results may degrade"
        ));
    }
}

/// A side floored to a multiple of 16, as the pipeline floors it.
pub fn floor_side(px: u32) -> u32 {
    floor_to_multiple_of_16(px as usize) as u32
}

/// A `--size` floored to multiples of 16, as the pipeline floors it.
pub fn floor_size(size: Size) -> Size {
    Size {
        width: floor_side(size.width),
        height: floor_side(size.height),
    }
}

/// The value the pipeline will use for a pixel option: `given` floored (`floor_side` or
/// `floor_size`; diffusers floors sizes to multiples of 16, spec §8), with a warning when that
/// changes it. Flooring up front lets the warning name the option and come before any model
/// loads; the pipeline's own warning could only name the size.
pub fn floored<T: Copy + PartialEq + Display>(
    option: &str,
    given: T,
    floor: fn(T) -> T,
    reporter: &mut Reporter,
) -> T {
    let used = floor(given);
    if used != given {
        reporter.warn(&format!(
            "{option} {given} is not a multiple of 16; using {used}"
        ));
    }
    used
}

/// Writes `text` to stdout (which carries only results) and flushes. A closed pipe
/// (`| head -1`) is not an error: the results are written; any other failure is (`> /dev/full`,
/// a closed stdout), so a script does not lose a path without knowing.
pub fn print_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::progress::Verbosity;

    #[test]
    fn flooring_names_the_option() {
        let mut reporter = Reporter::new(Verbosity::Quiet);
        assert_eq!(floored("--width", 1000, floor_side, &mut reporter), 992);
        assert_eq!(floored("--width", 64, floor_side, &mut reporter), 64);
        let size = Size {
            width: 100,
            height: 70,
        };
        assert_eq!(
            floored("--size", size, floor_size, &mut reporter),
            Size {
                width: 96,
                height: 64
            }
        );
    }
}

/// The adapter files of a run, each read and checked once (by the name it was given).
#[derive(Default)]
pub struct Adapters {
    by_source: std::collections::BTreeMap<String, std::sync::Arc<flux2_klein::lora::Lora>>,
}

impl Adapters {
    /// Reads every adapter in `specs` (repeats once), checked against the pipeline's
    /// transformer; what diffusers skips is warned about here.
    pub fn load<'a>(
        pipeline: &Pipeline,
        specs: impl IntoIterator<Item = &'a flux2_klein::lora::LoraSpec>,
        reporter: &mut Reporter,
    ) -> Result<Self> {
        let mut out = Self::default();
        out.add(pipeline, specs, reporter)?;
        Ok(out)
    }

    /// Reads the adapters of `specs` not read yet (a stream of prompts brings them one job at
    /// a time), as [`Adapters::load`].
    pub fn add<'a>(
        &mut self,
        pipeline: &Pipeline,
        specs: impl IntoIterator<Item = &'a flux2_klein::lora::LoraSpec>,
        reporter: &mut Reporter,
    ) -> Result<()> {
        for spec in specs {
            if self.by_source.contains_key(&spec.source) {
                continue;
            }
            let lora = pipeline.load_lora(&spec.source)?;
            for w in flux2_klein::ops::take_warnings() {
                reporter.warn(&w);
            }
            reporter.detail(&format!(
                "LoRA {} ({} layout, {} modules)",
                spec.source,
                lora.format.name(),
                lora.modules().count()
            ));
            self.by_source
                .insert(spec.source.clone(), std::sync::Arc::new(lora));
        }
        Ok(())
    }

    /// The adapters of `specs`, each at its scale (all were loaded by [`Adapters::load`]).
    pub fn applied(
        &self,
        specs: &[flux2_klein::lora::LoraSpec],
    ) -> Vec<flux2_klein::lora::AppliedLora> {
        specs
            .iter()
            .map(|s| flux2_klein::lora::AppliedLora {
                lora: self.by_source[&s.source].clone(),
                scale: s.scale,
            })
            .collect()
    }
}
