//! `flux2-klein generate`: check everything cheap (output paths and formats, reference
//! images, sizes, device), then resolve the model, run the pipeline over every image, and
//! write each image atomically as soon as it is decoded.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use flux2_klein::image_io::save_image_with_quality;
use flux2_klein::limits::MAX_IMAGES_PER_RUN;
use flux2_klein::pipeline::{uses_cfg, Cancelled, Generated, Pipeline, PipelineOptions, Request};

use super::args::GenerateArgs;
use super::common::{floor_side, floored, load_pipeline, print_stdout, warn_many_refs};
use super::device::{device_name, dtype_name, pipeline_options};
use super::init_images::{InitImages, InitPaths};
use super::jobs::{self, PromptJob};
use super::metadata::Recorded;
use super::progress::{fmt_bytes, fmt_duration, Reporter};
use super::references::{Loaded, Origin};

pub fn run(args: &GenerateArgs, reporter: &mut Reporter) -> Result<()> {
    if args.prompt.prompt_file.as_deref() == Some(Path::new("-")) {
        return run_streamed(args, reporter);
    }
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
    if let Some(e) = jobs.iter().find_map(|j| needs_fixed_seeds(j, args)) {
        bail!("{e}");
    }
    let first_seed = args.fixed_seed().unwrap_or_else(random_seed);
    let images = jobs::expand(&jobs, args.count, first_seed, args.output.as_deref());
    // Every image's name as the whole run gives it, then the images this run makes: those of
    // its shard, less those written already.
    let paths = super::output::plan_outputs(&images, reporter)?;
    let count = args.count as usize;
    let mut selected: Vec<usize> = (0..images.len())
        .filter(|&i| args.shard.is_none_or(|s| s.runs(i / count)))
        .collect();
    if let Some(shard) = args.shard {
        reporter.info(&format!(
            "shard {shard}: {} of {}",
            selected.len(),
            plural(images.len(), "image")
        ));
    }
    if args.skip_existing {
        let before = selected.len();
        selected.retain(|&i| !paths[i].is_file());
        report_skipped(before - selected.len(), reporter);
    }
    if selected.is_empty() {
        return Ok(());
    }
    let mut job_ids: Vec<usize> = selected.iter().map(|&i| i / count).collect();
    job_ids.dedup();
    let inits = jobs
        .iter()
        .map(|job| InitPaths::of(job, args))
        .collect::<Result<Vec<_>>>()?;
    // Any job's inputs, not only this part's: no part may overwrite what another reads.
    let inputs: Vec<&Path> = jobs
        .iter()
        .zip(&inits)
        .flat_map(|(job, init)| job_inputs(job, init.as_ref(), args))
        .collect();
    let written: Vec<&Path> = selected.iter().map(|&i| paths[i].as_path()).collect();
    super::output::check_written(&written, &inputs, reporter)?;
    let part_jobs: Vec<&PromptJob> = job_ids.iter().map(|&j| &jobs[j]).collect();
    let part_inits: Vec<Option<&InitPaths>> = job_ids.iter().map(|&j| inits[j].as_ref()).collect();
    let loaded = Inputs::load(&part_jobs, &part_inits, args, reporter)?;
    let size = floored_size(args, reporter);
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
        part_jobs.iter().flat_map(|j| j.loras(&args.sampling.loras)),
        reporter,
    )?;
    if part_jobs.iter().any(|j| random_seed_of(j, args)) {
        reporter.info(&format!("seed {first_seed}"));
    }
    warn_ignored_negative(args, part_jobs.iter().copied(), &pipeline, reporter);
    report_model(args, &pipeline, reporter);
    if selected.len() > 1 {
        reporter.info(&format!(
            "{} images ({} × {})",
            selected.len(),
            plural(part_jobs.len(), "prompt"),
            args.count
        ));
    }

    // --- Images. ---
    let part = Part {
        requests: selected
            .iter()
            .map(|&i| {
                let j = i / count;
                let init = inits[j].as_ref();
                request(
                    &jobs[j],
                    images[i].seed,
                    init,
                    &loaded,
                    &adapters,
                    size,
                    args,
                )
            })
            .collect(),
        outputs: selected.iter().map(|&i| paths[i].clone()).collect(),
        indices: selected,
        inputs: loaded,
    };
    let run = RunInfo::of(
        &pipeline,
        model_args.transformer.as_deref(),
        args.jpeg_quality,
    )?;
    write_images(&mut pipeline, &part, &run, args.json, reporter)
}

/// `generate --prompt-file -`: each line's images are made as soon as the line arrives,
/// with the models loaded once (at the first image) and kept loaded. The checks of a file's
/// run apply line by line; an image's number (`{index}`) counts the images of the lines read
/// so far, not zero-padded, as the total is not known.
fn run_streamed(args: &GenerateArgs, reporter: &mut Reporter) -> Result<()> {
    let first_seed = args.fixed_seed().unwrap_or_else(random_seed);
    let size = floored_size(args, reporter);
    let cancel = super::signals::install();
    let mut options = Some(PipelineOptions {
        cancel: cancel.clone(),
        ..pipeline_options(&args.model, true)?
    });
    let mut pipeline: Option<(Pipeline, RunInfo)> = None;
    let mut adapters = super::common::Adapters::default();
    let mut adapter_files = std::collections::BTreeSet::new();
    let mut names = super::output::OutputNames::default();
    let mut prompts = jobs::StdinPrompts::start(reporter);
    let count = args.count as usize;
    let mut seed_reported = false;
    // Jobs read; images of the lines read, of this shard, skipped, and written.
    let (mut jobs_read, mut planned, mut in_shard, mut skipped) = (0usize, 0, 0, 0);
    let written = std::cell::Cell::new(0);
    // A cancelled part reports the counts of the whole run.
    let whole_run = |e: anyhow::Error, total: usize| match e.downcast_ref::<Cancelled>() {
        Some(c) => Cancelled {
            finished: written.get(),
            total,
            reason: c.reason,
        }
        .into(),
        None => e,
    };
    while let Some(job) = prompts
        .next(&cancel)
        .map_err(|e| whole_run(e, in_shard - skipped))?
    {
        let line = job.line.unwrap_or(0);
        let index = jobs_read;
        jobs_read += 1;
        if jobs_read.saturating_mul(count) > MAX_IMAGES_PER_RUN {
            bail!(
                "stdin line {line}: more than {MAX_IMAGES_PER_RUN} images in one run — split \
                 the prompts into several runs or lower -n"
            );
        }
        super::limits::check_jobs(std::slice::from_ref(&job), args)?;
        adapter_files.extend(
            job.loras(&args.sampling.loras)
                .iter()
                .map(|l| l.source.clone()),
        );
        if adapter_files.len() > flux2_klein::limits::MAX_ADAPTER_FILES_PER_RUN {
            bail!(
                "stdin line {line}: more than {} distinct LoRA files in one run — split the \
                 prompts into several runs",
                flux2_klein::limits::MAX_ADAPTER_FILES_PER_RUN
            );
        }
        if let Some(e) = needs_fixed_seeds(&job, args) {
            bail!("stdin line {line}: {e}");
        }
        // Every line's names are checked, also those of other shards (as in a file's run).
        let template = job.output.as_deref().or(args.output.as_deref());
        let seed = job.seed.unwrap_or(first_seed);
        let mut images = Vec::with_capacity(count);
        for c in 0..count {
            let i = index * count + c;
            let seed = seed.wrapping_add(c as u64);
            let path = super::output::streamed_output_path(template, seed, i);
            let inserted = names.insert(i, &path, template, None);
            for w in names.take_warnings() {
                reporter.warn(&w);
            }
            inserted?;
            images.push((i, seed, path));
        }
        planned += count;
        if args.shard.is_some_and(|s| !s.runs(index)) {
            continue;
        }
        in_shard += count;
        if args.skip_existing {
            let before = images.len();
            images.retain(|(_, _, path)| !path.is_file());
            skipped += before - images.len();
        }
        if images.is_empty() {
            continue;
        }
        let init = InitPaths::of(&job, args)?;
        let inputs: Vec<&Path> = job_inputs(&job, init.as_ref(), args).collect();
        let outputs: Vec<&Path> = images.iter().map(|(_, _, p)| p.as_path()).collect();
        super::output::check_written(&outputs, &inputs, reporter)?;
        let loaded = Inputs::load(&[&job], &[init.as_ref()], args, reporter)?;
        let (pipeline, run) = match &mut pipeline {
            Some(p) => p,
            None => {
                let options = options.take().expect("the pipeline is opened once");
                let p = load_pipeline(&args.model, &args.sampling, options, reporter)?;
                report_model(args, &p, reporter);
                let run = RunInfo::of(&p, args.model.transformer.as_deref(), args.jpeg_quality)?;
                pipeline.insert((p, run))
            }
        };
        if !seed_reported && random_seed_of(&job, args) {
            reporter.info(&format!("seed {first_seed}"));
            seed_reported = true;
        }
        adapters.add(pipeline, job.loras(&args.sampling.loras), reporter)?;
        warn_ignored_negative(args, [&job], pipeline, reporter);
        let part = Part {
            requests: images
                .iter()
                .map(|&(_, seed, _)| {
                    request(&job, seed, init.as_ref(), &loaded, &adapters, size, args)
                })
                .collect(),
            indices: images.iter().map(|(i, _, _)| *i).collect(),
            outputs: images.into_iter().map(|(_, _, p)| p).collect(),
            inputs: loaded,
        };
        let total = in_shard - skipped;
        let done = written.get();
        write_images(pipeline, &part, run, args.json, reporter).map_err(|e| {
            // The images of this part written before it stopped.
            if let Some(c) = e.downcast_ref::<Cancelled>() {
                written.set(done + c.finished);
            }
            whole_run(e, total)
        })?;
        written.set(done + part.requests.len());
    }
    if jobs_read == 0 {
        bail!("{}", jobs::no_prompts(Path::new("-")));
    }
    if let Some(shard) = args.shard {
        reporter.info(&format!(
            "shard {shard}: {in_shard} of {}",
            plural(planned, "image")
        ));
    }
    report_skipped(skipped, reporter);
    Ok(())
}

/// Whether `job`'s images get a random seed (no `--seed N` and no seed of its own).
fn random_seed_of(job: &PromptJob, args: &GenerateArgs) -> bool {
    args.fixed_seed().is_none() && job.seed.is_none()
}

/// The error of `--skip-existing` when `job` gets a random seed (`None` without
/// `--skip-existing`, or with a fixed seed).
fn needs_fixed_seeds(job: &PromptJob, args: &GenerateArgs) -> Option<String> {
    if !args.skip_existing || !random_seed_of(job, args) {
        return None;
    }
    let which = match job.line {
        Some(line) => format!(" (line {line} has no \"seed\")"),
        None => String::new(),
    };
    Some(format!(
        "--skip-existing needs fixed seeds: pass --seed N, or a \"seed\" on every prompt-file \
         line{which}; with random seeds the names and images change from run to run"
    ))
}

/// "skipped 3 existing images", when any were.
fn report_skipped(skipped: usize, reporter: &Reporter) {
    if skipped > 0 {
        reporter.info(&format!(
            "skipped {} (--skip-existing)",
            plural(skipped, "existing image")
        ));
    }
}

/// `-W/-H`, floored to multiples of 16 (with a warning when that changes them).
fn floored_size(args: &GenerateArgs, reporter: &mut Reporter) -> (Option<u32>, Option<u32>) {
    let width = args
        .width
        .map(|w| floored("--width", w, floor_side, reporter));
    let height = args
        .height
        .map(|h| floored("--height", h, floor_side, reporter));
    (width, height)
}

/// The files `job` reads: its references, init image and mask.
fn job_inputs<'a>(
    job: &'a PromptJob,
    init: Option<&'a InitPaths>,
    args: &'a GenerateArgs,
) -> impl Iterator<Item = &'a Path> {
    job.refs(&args.refs).iter().map(PathBuf::as_path).chain(
        init.into_iter()
            .flat_map(|i| std::iter::once(i.init.as_path()).chain(i.mask.as_deref())),
    )
}

/// The decoded inputs of some jobs of a run (their references, init images and masks), each
/// file checked and hashed once.
struct Inputs {
    references: Loaded,
    inits: InitImages,
}

impl Inputs {
    /// Loads the inputs of `jobs` (`inits`: theirs, in order) and checks the jobs' output
    /// sizes, which can depend on the first reference.
    fn load(
        jobs: &[&PromptJob],
        inits: &[Option<&InitPaths>],
        args: &GenerateArgs,
        reporter: &mut Reporter,
    ) -> Result<Self> {
        let references = load_references(jobs, args, reporter)?;
        let mut init_images = InitImages::default();
        for init in inits.iter().flatten() {
            init_images.add(init)?;
        }
        super::limits::check_sizes(jobs, args, &references)?;
        Ok(Self {
            references,
            inits: init_images,
        })
    }
}

impl Inputs {
    /// The content hash of the input named `name` (a reference, init image or mask of these
    /// jobs).
    fn sha256(&self, name: &str) -> String {
        let hashes = [&self.references.sha256, &self.inits.sha256];
        hashes
            .iter()
            .find_map(|h| h.get(name))
            .cloned()
            .unwrap_or_default()
    }
}

/// The request of one image of `job`.
fn request(
    job: &PromptJob,
    seed: u64,
    init: Option<&InitPaths>,
    inputs: &Inputs,
    adapters: &super::common::Adapters,
    (width, height): (Option<u32>, Option<u32>),
    args: &GenerateArgs,
) -> Request {
    Request {
        prompt: job.prompt.clone(),
        negative_prompt: negative_prompt(job, args).cloned().unwrap_or_default(),
        references: inputs.references.get(job.refs(&args.refs)),
        // A job's own size is floored (with a warning) by the pipeline.
        width: job.width.or(width).map(|w| w as usize),
        height: job.height.or(height).map(|h| h as usize),
        // Unset: the checkpoint's defaults (the pipeline's).
        steps: job.steps.or(args.sampling.steps).map(|s| s as usize),
        guidance: job.guidance.or(args.sampling.guidance),
        seed,
        init: init.map(|i| inputs.inits.request(i)),
        adapters: adapters.applied(job.loras(&args.sampling.loras)),
    }
}

/// Images of a run for one `generate_batch`: the whole run, or one line of a stream.
struct Part {
    requests: Vec<Request>,
    outputs: Vec<PathBuf>,
    /// Each image's 0-based number in the whole run (`{index}`, the `--json` record's).
    indices: Vec<usize>,
    inputs: Inputs,
}

/// Runs the part's batch and writes each image as it comes, then reports it (its path, or
/// with `--json` its record, on stdout).
fn write_images(
    pipeline: &mut Pipeline,
    part: &Part,
    run: &RunInfo,
    json: bool,
    reporter: &mut Reporter,
) -> Result<()> {
    let device = pipeline.options.device.clone();
    // Progress events and the per-image callback both report.
    let reporter = std::cell::RefCell::new(reporter);
    pipeline.generate_batch(
        &part.requests,
        &mut |e| reporter.borrow_mut().event(e),
        &mut |i, generated| {
            let (path, request) = (&part.outputs[i], &part.requests[i]);
            let recorded = run.recorded(request, &generated, &|n| part.inputs.sha256(n));
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
                let index = part.indices[i];
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
    jobs: &[&PromptJob],
    args: &GenerateArgs,
    reporter: &mut Reporter,
) -> Result<Loaded> {
    let mut loaded = Loaded::default();
    for &job in jobs {
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

/// A warning for each job whose negative prompt will be ignored (no classifier-free
/// guidance runs).
fn warn_ignored_negative<'a>(
    args: &GenerateArgs,
    jobs: impl IntoIterator<Item = &'a PromptJob>,
    pipeline: &Pipeline,
    reporter: &mut Reporter,
) {
    for job in jobs {
        // What the pipeline resolves an unset value to (its default), for the message.
        let guidance = job
            .guidance
            .or(args.sampling.guidance)
            .unwrap_or_else(|| pipeline.default_guidance());
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
}

/// The model and the run's settings on stderr (`-v`).
fn report_model(args: &GenerateArgs, pipeline: &Pipeline, reporter: &mut Reporter) {
    let kind = if pipeline.is_distilled() {
        "distilled"
    } else {
        "base"
    };
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
pub(super) struct RunInfo {
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
    pub(super) jpeg_quality: u8,
    /// `--transformer` as given and its file's SHA-256.
    transformer: Option<(String, String)>,
    quantize: Option<&'static str>,
}

impl RunInfo {
    pub(super) fn of(
        pipeline: &Pipeline,
        transformer: Option<&str>,
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
        })
    }

    /// The settings that reproduce the image (the PNG's metadata, the `--json` record);
    /// `sha256` gives the content hash of each of its references, init image and mask by name.
    pub(super) fn recorded(
        &self,
        request: &Request,
        generated: &Generated,
        sha256: &dyn Fn(&str) -> String,
    ) -> Recorded {
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
            references_sha256: names.iter().map(|n| sha256(n)).collect(),
            references: names,
            init_image: init.map(|i| i.name.clone()),
            init_image_sha256: init.map(|i| sha256(&i.name)),
            mask: mask.map(|m| m.name.clone()),
            mask_sha256: mask.map(|m| sha256(&m.name)),
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
