//! `flux2-klein generate`: check everything cheap (output paths and formats, reference
//! images, sizes, device), then resolve the model, run the pipeline over every image, and
//! write each image atomically as soon as it is decoded.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Device;
use flux2_klein::image_io::save_image;
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
    let jobs = match &args.prompt.config_from_metadata {
        Some(png) => vec![job_from_metadata(png, args, reporter)?],
        None => jobs::read(&args.prompt, reporter)?,
    };
    super::limits::check_jobs(&jobs, args)?;
    let first_seed = args.seed.unwrap_or_else(random_seed);
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
    let options = pipeline_options(&args.model, args.resident)?;

    // --- Model. ---
    let mut pipeline = load_pipeline(&args.model, &args.sampling, options, reporter)?;
    // Every adapter read and checked against the model before any weights load.
    let adapters = super::common::Adapters::load(
        &pipeline,
        jobs.iter().flat_map(|j| j.loras(&args.sampling.loras)),
        reporter,
    )?;
    if args.seed.is_none() && jobs.iter().any(|j| j.seed.is_none()) {
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
    let run = RunInfo::of(&pipeline, references, init_images);
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
            save_image(path, &generated.image, &recorded.to_text_chunks())?;
            let mut reporter = reporter.borrow_mut();
            reporter.finish();
            summarize(&generated, &device, &reporter);
            let line = if json {
                result_json(run, request, &recorded, &generated, path, index).to_string()
            } else {
                path.display().to_string()
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

/// `--config-from-metadata PNG`: the job recorded in the PNG, where an option given on the
/// command line wins over the recorded value. Warns when this run cannot give the same image:
/// another model, or a reference file missing or changed since (its recorded SHA-256).
fn job_from_metadata(
    png: &Path,
    args: &GenerateArgs,
    reporter: &mut Reporter,
) -> Result<PromptJob> {
    let recorded = Recorded::read(png)?;
    let mut job = PromptJob::from_recorded(&recorded);
    if let Some(prompt) = &args.prompt.prompt {
        job.prompt = prompt.clone();
    }
    if args.seed.is_some() {
        job.seed = None;
    }
    // New references set the size (from the first one) unless -W/-H do.
    if args.width.is_some() || !args.refs.is_empty() {
        job.width = None;
    }
    if args.height.is_some() || !args.refs.is_empty() {
        job.height = None;
    }
    if args.sampling.steps.is_some() {
        job.steps = None;
    }
    if args.sampling.guidance.is_some() {
        job.guidance = None;
    }
    if args.negative_prompt.is_some() {
        job.negative_prompt = None;
    }
    if !args.refs.is_empty() {
        job.refs = None;
    }
    let a = &args.inpaint;
    if a.init_image.is_some() {
        job.init_image = None;
        job.width = None;
        job.height = None;
    }
    if a.mask.is_some() {
        job.mask = None;
    }
    if a.strength.is_some() {
        job.strength = None;
    }
    if a.padding_mask_crop.is_some() {
        job.padding_mask_crop = None;
    }
    if !args.sampling.loras.is_empty() {
        job.lora = None;
    }

    let model = args.model.source.model_id();
    if let Some(made_with) = recorded.model.as_deref().filter(|m| *m != model) {
        reporter.warn(&format!(
            "{} was made with the model {made_with}; this run uses {model} (pass -m \
             {made_with} to make the same image)",
            png.display()
        ));
    }
    let recorded_inputs = [
        (
            a.init_image.is_none(),
            "init image",
            &recorded.init_image,
            &recorded.init_image_sha256,
        ),
        (
            a.mask.is_none(),
            "mask",
            &recorded.mask,
            &recorded.mask_sha256,
        ),
    ];
    for (used, what, name, hash) in recorded_inputs {
        let (Some(name), Some(hash), true) = (name, hash, used) else {
            continue;
        };
        let state = match flux2_klein::image_io::sha256_file(name) {
            Ok(now) if now == *hash => continue,
            Ok(_) => "has changed (another SHA-256) since",
            Err(_) => "is missing, recorded in",
        };
        reporter.warn(&format!(
            "the {what} {name} {state} {}, so the image will differ",
            png.display()
        ));
    }
    if args.sampling.loras.is_empty() {
        for (lora, hash) in recorded.loras.iter().zip(&recorded.loras_sha256) {
            // A hub file that is not in the cache counts as unchanged (it is fetched by name).
            let Ok(path) = flux2_klein::lora::resolve(&lora.source) else {
                continue;
            };
            match flux2_klein::image_io::sha256_file(&path) {
                Ok(now) if now == *hash => {}
                _ => reporter.warn(&format!(
                    "the LoRA file {} has changed (another SHA-256) since {}, so the image will \
                     differ",
                    lora.source,
                    png.display()
                )),
            }
        }
    }
    if args.refs.is_empty() {
        for (name, hash) in recorded.references.iter().zip(&recorded.references_sha256) {
            let state = match flux2_klein::image_io::sha256_file(name) {
                Ok(now) if now == *hash => continue,
                Ok(_) => "has changed (another SHA-256) since",
                Err(_) => "is missing, recorded in",
            };
            reporter.warn(&format!(
                "the reference {name} {state} {}, so the image will differ",
                png.display()
            ));
        }
    }
    Ok(job)
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
    references: Loaded,
    inits: InitImages,
}

impl RunInfo {
    fn of(pipeline: &Pipeline, references: Loaded, inits: InitImages) -> Self {
        let o = &pipeline.options;
        Self {
            distilled: pipeline.is_distilled(),
            model: pipeline.model.id.clone(),
            revision: pipeline.model.revision.clone(),
            device: device_name(&o.device),
            dtype: dtype_name(o.dtype),
            vae_dtype: o.vae_dtype.map(dtype_name),
            references,
            inits,
        }
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
        "timings: load {}, text encode {}, references {}, denoise {}{per_step}, VAE decode {}, total {}",
        fmt_duration(t.load),
        fmt_duration(t.text_encode),
        fmt_duration(t.reference_encode),
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
            "steps": t.steps.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "vae_decode": ms(t.vae_decode),
            "total": ms(t.total),
        },
    })
}
