//! `flux2-klein generate`: check everything cheap (output paths and formats, reference
//! images, sizes, device), then resolve the model, run the pipeline over every image, and
//! write each image atomically as soon as it is decoded.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use flux2_klein::image_io::save_image_with_quality;
use flux2_klein::pipeline::{uses_cfg, Generated, Pipeline, Request};

use super::args::GenerateArgs;
use super::common::{floor_side, floored, load_pipeline, print_stdout, warn_many_refs};
use super::device::{device_name, dtype_name, pipeline_options};
use super::init_images::{job_init, InitImages, InitPaths};
use super::jobs::{self, PromptJob};
use super::metadata::Recorded;
use super::output::check_outputs;
use super::progress::{fmt_bytes, fmt_duration, Reporter};
use super::references::{Loaded, Origin};

pub fn run(args: &GenerateArgs, reporter: &mut Reporter) -> Result<()> {
    // --- Cheap checks, before any weights are touched. ---
    // With --config-from-metadata, the arguments with the recorded model settings filled in.
    let applied: GenerateArgs;
    let (jobs, args, recorded) = match &args.prompt.config_from_metadata {
        Some(image) => {
            let (job, with_recorded, recorded) =
                super::remake::job_from_metadata(image, args, reporter)?;
            applied = with_recorded;
            (vec![job], &applied, Some(recorded))
        }
        None => (jobs::read(&args.prompt, reporter)?, args, None),
    };
    super::limits::check_jobs(&jobs, args)?;
    let first_seed = args.fixed_seed().unwrap_or_else(random_seed);
    let images = jobs::expand(&jobs, args.count, first_seed, args.output.as_deref());
    let inits = jobs
        .iter()
        .map(|job| InitPaths::of(job, args))
        .collect::<Result<Vec<_>>>()?;
    let inputs: Vec<&Path> = jobs
        .iter()
        .flat_map(|job| job.refs(&args.refs))
        .map(PathBuf::as_path)
        .chain(
            inits
                .iter()
                .flatten()
                .flat_map(|i| std::iter::once(i.init.as_path()).chain(i.mask.as_deref())),
        )
        .collect();
    let outputs = check_outputs(&images, &inputs, reporter)?;
    let references = load_references(&jobs, args, reporter)?;
    let mut init_images = InitImages::default();
    for init in inits.iter().flatten() {
        init_images.add(init)?;
    }
    super::limits::check_sizes(&jobs, args, &references)?;
    let width = args
        .width
        .map(|w| floored("--width", w, floor_side, reporter));
    let height = args
        .height
        .map(|h| floored("--height", h, floor_side, reporter));
    // --config-from-metadata: the recorded transformer file and quantisation, unless given.
    let mut model_args = args.model.clone();
    if let Some(image) = &args.prompt.config_from_metadata {
        super::remake::recorded_weights(image, &mut model_args, reporter)?;
    }
    let mut options = pipeline_options(&model_args, args.resident)?;
    // From here a SIGINT/SIGTERM stops the run between steps or images (exit 130/143).
    options.cancel = super::signals::install();
    if let (Some(recorded), Some(image)) = (&recorded, &args.prompt.config_from_metadata) {
        super::remake::warn_other_device(recorded, image, &options, reporter);
    }

    // --- Model. ---
    let mut pipeline = load_pipeline(&model_args, &args.sampling, options, reporter)?;
    // Every adapter read and checked against the model before any weights load.
    let adapters = super::common::Adapters::load(
        &pipeline,
        jobs.iter().flat_map(|j| j.loras(&args.sampling.loras)),
        reporter,
    )?;
    if args.fixed_seed().is_none() && jobs.iter().any(|j| j.seed.is_none()) {
        reporter.info(&format!("seed {first_seed}"));
    }
    report_settings(args, &jobs, images.len(), &pipeline, reporter);

    // --- Images. ---
    let requests: Vec<Request> = images
        .iter()
        .map(|image| Request {
            prompt: image.job.prompt.clone(),
            negative_prompt: negative_prompt(image.job, args)
                .cloned()
                .unwrap_or_default(),
            references: references.get(image.job.refs(&args.refs)),
            // A job's own size is floored (with a warning) by the pipeline.
            width: image.job.width.or(width).map(|w| w as usize),
            height: image.job.height.or(height).map(|h| h as usize),
            // Unset: the checkpoint's defaults (the pipeline's).
            steps: image.job.steps.or(args.sampling.steps).map(|s| s as usize),
            guidance: image.job.guidance.or(args.sampling.guidance),
            seed: image.seed,
            init: job_init(image.job, &jobs, &inits).map(|i| init_images.request(i)),
            adapters: adapters.applied(image.job.loras(&args.sampling.loras)),
        })
        .collect();
    let run = RunInfo::of(
        &pipeline,
        model_args.transformer.as_deref(),
        references,
        init_images,
        args.jpeg_quality,
    )?;
    write_images(
        &mut pipeline,
        &requests,
        &outputs,
        &run,
        args.json,
        reporter,
    )
}

/// Runs the batch and writes each image as it comes, then reports it (its path, or with
/// `--json` its record, on stdout).
fn write_images(
    pipeline: &mut Pipeline,
    requests: &[Request],
    outputs: &[PathBuf],
    run: &RunInfo,
    json: bool,
    reporter: &mut Reporter,
) -> Result<()> {
    let device = pipeline.options.device.clone();
    // Progress events and the per-image callback both report.
    let reporter = std::cell::RefCell::new(reporter);
    pipeline.generate_batch(
        requests,
        &mut |e| reporter.borrow_mut().event(e),
        &mut |index, generated| {
            let (path, request) = (&outputs[index], &requests[index]);
            let recorded = run.recorded(request, &generated);
            super::output::create_parent(path)?;
            save_image_with_quality(
                path,
                &generated.image,
                &recorded.to_text_chunks(),
                run.jpeg_quality,
            )?;
            let mut reporter = reporter.borrow_mut();
            reporter.finish();
            // The encoder's warnings (settings too long for a JPEG's EXIF) come after the
            // pipeline's last stage has drained its queue.
            for w in flux2_klein::ops::take_warnings() {
                reporter.warn(&w);
            }
            summarize(&generated, &device, &reporter);
            let line = if json {
                result_json(run, request, &recorded, &generated, path, index).to_string()
            } else {
                flux2_klein::text::escape_control(&path.display().to_string()).into_owned()
            };
            print_stdout(&(line + "\n"))
        },
    )
}

/// Each job's references, checked and hashed (each distinct file once).
fn load_references(
    jobs: &[PromptJob],
    args: &GenerateArgs,
    reporter: &mut Reporter,
) -> Result<Loaded> {
    let mut loaded = Loaded::default();
    for job in jobs {
        let origin = match (&job.refs, job.line, &args.prompt) {
            (None, ..) => Origin::Flag,
            (Some(_), Some(line), p) => Origin::PromptFile {
                file: p.prompt_file.as_deref().unwrap_or(Path::new("-")),
                line,
            },
            (Some(_), None, p) => Origin::Metadata {
                png: p.config_from_metadata.as_deref().unwrap_or(Path::new("")),
            },
        };
        for path in job.refs(&args.refs) {
            loaded.add(path, origin, reporter)?;
        }
        warn_many_refs(job.refs(&args.refs).len(), reporter);
    }
    Ok(loaded)
}

/// The job's negative prompt, else `--negative-prompt`.
fn negative_prompt<'a>(job: &'a PromptJob, args: &'a GenerateArgs) -> Option<&'a String> {
    job.negative_prompt
        .as_ref()
        .or(args.negative_prompt.as_ref())
}

/// The run's settings on stderr: a warning for each negative prompt that will be ignored, the
/// model and settings (`-v`), and the batch size.
fn report_settings(
    args: &GenerateArgs,
    jobs: &[PromptJob],
    images: usize,
    pipeline: &Pipeline,
    reporter: &mut Reporter,
) {
    let kind = if pipeline.is_distilled() {
        "distilled"
    } else {
        "base"
    };
    // What the pipeline resolves an unset value to (its defaults), for the messages.
    let guidance_of = |job: &PromptJob| {
        job.guidance
            .or(args.sampling.guidance)
            .unwrap_or_else(|| pipeline.default_guidance())
    };
    for job in jobs {
        let guidance = guidance_of(job);
        if !pipeline.uses_cfg(guidance) && negative_prompt(job, args).is_some_and(|p| !p.is_empty())
        {
            reporter.warn(&format!(
                "the negative prompt is ignored: it only acts through classifier-free \
                 guidance, which runs on base checkpoints with --guidance > 1 ({} is {}, \
                 guidance {guidance})",
                pipeline.model.id,
                if pipeline.is_distilled() {
                    "distilled"
                } else {
                    "a base checkpoint"
                }
            ));
        }
    }
    let steps = args
        .sampling
        .steps
        .map_or_else(|| pipeline.default_steps(), |s| s as usize);
    let guidance = args
        .sampling
        .guidance
        .unwrap_or_else(|| pipeline.default_guidance());
    reporter.detail(&format!(
        "model {} ({kind}), device {}, dtype {} (VAE {}), {}, guidance {guidance}",
        pipeline.model.label(),
        device_name(&pipeline.options.device),
        dtype_name(pipeline.options.dtype),
        dtype_name(pipeline.options.vae_dtype()),
        plural(steps, "step"),
    ));
    if images > 1 {
        reporter.info(&format!(
            "{images} images ({} × {})",
            plural(jobs.len(), "prompt"),
            args.count
        ));
    }
}

/// Seeds a user can type back: 0 ..= u32::MAX (any u64 is accepted by `--seed`).
fn random_seed() -> u64 {
    rand::random::<u32>() as u64
}

/// "1 step", "4 steps".
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// What every image of a run shares, for its metadata.
struct RunInfo {
    /// Whether the checkpoint is distilled (see `pipeline::uses_cfg`).
    distilled: bool,
    model: String,
    revision: Option<String>,
    device: String,
    dtype: &'static str,
    /// Only when given (`--vae-dtype`).
    vae_dtype: Option<&'static str>,
    /// Only when given (`--vae-tile`).
    vae_tile: Option<u32>,
    jpeg_quality: u8,
    /// `--transformer` as given and its file's SHA-256.
    transformer: Option<(String, String)>,
    quantize: Option<&'static str>,
    references: Loaded,
    inits: InitImages,
}

impl RunInfo {
    fn of(
        pipeline: &Pipeline,
        transformer: Option<&str>,
        references: Loaded,
        inits: InitImages,
        jpeg_quality: u8,
    ) -> Result<Self> {
        let o = &pipeline.options;
        let transformer = match (transformer, &o.transformer_file) {
            (Some(name), Some(path)) => Some((
                name.to_string(),
                flux2_klein::image_io::sha256_file(path)
                    .with_context(|| format!("hashing {}", path.display()))?,
            )),
            _ => None,
        };
        Ok(Self {
            distilled: pipeline.is_distilled(),
            model: pipeline.model.id.clone(),
            revision: pipeline.model.revision.clone(),
            device: device_name(&o.device),
            dtype: dtype_name(o.dtype),
            vae_dtype: o.vae_dtype.map(dtype_name),
            vae_tile: o.vae_tile.map(|t| t as u32),
            jpeg_quality,
            transformer,
            quantize: o.quantize.map(|q| q.name()),
            references,
            inits,
        })
    }

    /// The settings that reproduce the image (the PNG's metadata, the `--json` record).
    fn recorded(&self, request: &Request, generated: &Generated) -> Recorded {
        let names: Vec<String> = request.references.iter().map(|r| r.name.clone()).collect();
        let init = request.init.as_ref();
        let mask = init.and_then(|i| i.mask.as_ref());
        Recorded {
            prompt: request.prompt.clone(),
            negative_prompt: (uses_cfg(self.distilled, generated.guidance)
                && !request.negative_prompt.is_empty())
            .then(|| request.negative_prompt.clone()),
            seed: Some(generated.seed),
            steps: Some(generated.steps),
            guidance: Some(generated.guidance),
            size: Some((generated.width, generated.height)),
            model: Some(self.model.clone()),
            revision: self.revision.clone(),
            // Content hashes, so a golden image records exactly which inputs made it.
            references_sha256: names
                .iter()
                .map(|n| self.references.sha256[n].clone())
                .collect(),
            references: names,
            init_image: init.map(|i| i.name.clone()),
            init_image_sha256: init.map(|i| self.inits.sha256[&i.name].clone()),
            mask: mask.map(|m| m.name.clone()),
            mask_sha256: mask.map(|m| self.inits.sha256[&m.name].clone()),
            strength: init.map(|i| i.strength),
            padding_mask_crop: init.and_then(|i| i.padding_mask_crop),
            transformer: self.transformer.as_ref().map(|(name, _)| name.clone()),
            transformer_sha256: self.transformer.as_ref().map(|(_, hash)| hash.clone()),
            quantize: self.quantize.map(str::to_string),
            loras: request
                .adapters
                .iter()
                .map(|a| flux2_klein::lora::LoraSpec {
                    source: a.lora.label.clone(),
                    scale: a.scale,
                })
                .collect(),
            loras_sha256: request
                .adapters
                .iter()
                .map(|a| a.lora.sha256.clone())
                .collect(),
            device: Some(self.device.clone()),
            dtype: Some(self.dtype.to_string()),
            vae_dtype: self.vae_dtype.map(str::to_string),
            vae_tile: self.vae_tile,
            software: Some(format!("flux2-klein {}", env!("CARGO_PKG_VERSION"))),
        }
    }
}

fn summarize(g: &Generated, device: &Device, reporter: &Reporter) {
    let t = &g.timings;
    reporter.info(&format!(
        "{}{}×{}, {}, seed {}, {}",
        reporter.job_prefix(),
        g.width,
        g.height,
        plural(g.steps, "step"),
        g.seed,
        fmt_duration(t.total)
    ));
    let denoise: std::time::Duration = t.steps.iter().sum();
    let per_step = if t.steps.is_empty() {
        String::new()
    } else {
        format!(" ({}/step)", fmt_duration(denoise / t.steps.len() as u32))
    };
    reporter.detail(&format!(
        "timings: load {}, text encode {}, references {}{}, denoise {}{per_step}, VAE decode {}, total {}",
        fmt_duration(t.load),
        fmt_duration(t.text_encode),
        fmt_duration(t.reference_encode),
        if t.reference_kv.is_zero() {
            String::new()
        } else {
            format!(", reference K/V {}", fmt_duration(t.reference_kv))
        },
        fmt_duration(denoise),
        fmt_duration(t.vae_decode),
        fmt_duration(t.total),
    ));
    if let Some(peak) = flux2_klein::ops::device::peak(device) {
        reporter.detail(&format!("peak device memory: {}", fmt_bytes(peak)));
    }
}

/// The `--json` record of image `index` (0-based) of the run, written to `path`.
fn result_json(
    run: &RunInfo,
    request: &Request,
    recorded: &Recorded,
    generated: &Generated,
    path: &Path,
    index: usize,
) -> serde_json::Value {
    let t = &generated.timings;
    // Milliseconds to the microsecond.
    let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    serde_json::json!({
        // 1-based, as `{index}` in --output.
        "index": index + 1,
        "path": path.display().to_string(),
        "prompt": recorded.prompt,
        // null when no classifier-free guidance ran (the negative prompt had no effect).
        "negative_prompt": uses_cfg(run.distilled, generated.guidance)
            .then_some(&request.negative_prompt),
        "seed": generated.seed,
        "width": generated.width,
        "height": generated.height,
        "steps": generated.steps,
        "guidance": generated.guidance,
        "references": recorded.references,
        "references_sha256": recorded.references_sha256,
        "init_image": recorded.init_image,
        "mask": recorded.mask,
        "strength": recorded.strength,
        "loras": recorded.loras.iter().zip(&recorded.loras_sha256).map(|(l, h)| serde_json::json!({
            "path": l.source, "scale": l.scale, "sha256": h,
        })).collect::<Vec<_>>(),
        "model": recorded.model,
        "revision": recorded.revision,
        "timings_ms": {
            "load": ms(t.load),
            "text_encode": ms(t.text_encode),
            "reference_encode": ms(t.reference_encode),
            "reference_kv": ms(t.reference_kv),
            "steps": t.steps.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "vae_decode": ms(t.vae_decode),
            "total": ms(t.total),
        },
    })
}
