//! `flux2-klein generate`: check everything cheap (output path and format, reference images,
//! sizes, device), then resolve the model, run the pipeline once per prompt, and write each
//! image atomically at the very end.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::Result;
use candle_core::Device;
use flux2_klein::pipeline::{
    floor_to_multiple_of_16, uses_cfg, Generated, Pipeline, PipelineOptions, Reference, Request,
};

use super::args::{metadata_value, GenerateArgs, ModelArgs, PromptJob, SamplingArgs};
use super::device::{device_name, dtype_name, pipeline_options};
use super::output::{check_output, output_paths, Format};
use super::progress::{fmt_bytes, fmt_duration, Reporter};
use super::references::{load_reference, TRAINED_MAX_REFS};
use flux2_klein::image_io::save_image;

pub fn run(args: &GenerateArgs, reporter: &mut Reporter) -> Result<()> {
    // --- Cheap checks, before any weights are touched. ---
    let jobs = match &args.prompt.config_from_metadata {
        Some(png) => vec![job_from_metadata(png, args, reporter)?],
        None => args.prompt.jobs()?,
    };
    let first_seed = args.seed.unwrap_or_else(random_seed);
    // Every job (prompt line) makes --count images with seeds s, s + 1, … where s is the
    // line's own seed or --seed.
    let images: Vec<(&PromptJob, u64)> = jobs
        .iter()
        .flat_map(|job| {
            let seed = job.seed.unwrap_or(first_seed);
            (0..args.count as u64).map(move |c| (job, seed.wrapping_add(c)))
        })
        .collect();
    let templates: Vec<(Option<&Path>, u64)> = images
        .iter()
        .map(|&(job, seed)| (job.output.as_deref().or(args.output.as_deref()), seed))
        .collect();
    let outputs = output_paths(&templates)?;
    let mut checked_dirs = std::collections::HashSet::new();
    for path in &outputs {
        // The format of every name; the directory probe once per directory.
        Format::from_path(path)?;
        if checked_dirs.insert(path.parent().map(Path::to_path_buf)) {
            check_output(path)?;
        }
    }
    // Each distinct reference file is decoded, checked and hashed (for the metadata) once.
    let mut loaded: HashMap<&Path, Reference> = HashMap::new();
    let mut ref_sha256: HashMap<String, String> = HashMap::new();
    for path in jobs
        .iter()
        .flat_map(|job| job.refs.as_deref().unwrap_or(&args.refs))
    {
        if !loaded.contains_key(path.as_path()) {
            let reference = load_reference(path)?;
            let hash =
                flux2_klein::image_io::sha256_file(path).unwrap_or_else(|_| "unreadable".into());
            ref_sha256.insert(reference.name.clone(), hash);
            loaded.insert(path.as_path(), reference);
        }
    }
    let references_of = |job: &PromptJob| -> Vec<Reference> {
        job.refs
            .as_deref()
            .unwrap_or(&args.refs)
            .iter()
            .map(|p| loaded[p.as_path()].clone())
            .collect()
    };
    for job in &jobs {
        warn_many_refs(job.refs.as_ref().unwrap_or(&args.refs).len(), reporter);
    }
    let width = floor_to_16("width", args.width, reporter);
    let height = floor_to_16("height", args.height, reporter);
    let options = pipeline_options(&args.model, args.resident)?;

    // --- Model. ---
    let (mut pipeline, steps, guidance) =
        load_pipeline(&args.model, &args.sampling, options, reporter)?;

    if args.seed.is_none() && jobs.iter().any(|j| j.seed.is_none()) {
        reporter.info(&format!("seed {first_seed}"));
    }
    for job in &jobs {
        let guidance = job.guidance.unwrap_or(guidance);
        let negative = job
            .negative_prompt
            .as_ref()
            .or(args.negative_prompt.as_ref());
        if !pipeline.uses_cfg(guidance) && negative.is_some_and(|p| !p.is_empty()) {
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
    reporter.detail(&format!(
        "model {} ({}), device {}, dtype {} (VAE {}), {steps} steps, guidance {guidance}",
        pipeline.model.label(),
        if pipeline.is_distilled() {
            "distilled"
        } else {
            "base"
        },
        device_name(&pipeline.options.device),
        dtype_name(pipeline.options.dtype),
        dtype_name(pipeline.options.vae_dtype.unwrap_or(pipeline.options.dtype)),
    ));
    if images.len() > 1 {
        reporter.info(&format!(
            "{} images ({} prompt{} × {})",
            images.len(),
            jobs.len(),
            if jobs.len() == 1 { "" } else { "s" },
            args.count
        ));
    }

    let requests: Vec<Request> = images
        .iter()
        .map(|&(job, seed)| Request {
            prompt: job.prompt.clone(),
            negative_prompt: job
                .negative_prompt
                .clone()
                .or_else(|| args.negative_prompt.clone())
                .unwrap_or_default(),
            references: references_of(job),
            // A line's own size is floored (with a warning) by the pipeline.
            width: job.width.map(|w| w as usize).or(width),
            height: job.height.map(|h| h as usize).or(height),
            steps: Some(job.steps.map_or(steps, |s| s as usize)),
            guidance: Some(job.guidance.unwrap_or(guidance)),
            seed,
        })
        .collect();
    let run_info = RunInfo::of(&pipeline, ref_sha256);
    let device = pipeline.options.device.clone();
    // Progress events and the per-image callback both report.
    let reporter = std::cell::RefCell::new(reporter);
    pipeline.generate_batch(
        &requests,
        &mut |e| reporter.borrow_mut().event(e),
        &mut |index, generated| {
            let path = &outputs[index];
            let request = &requests[index];
            save_image(
                path,
                &generated.image,
                &metadata(&run_info, request, &generated),
            )?;
            let mut reporter = reporter.borrow_mut();
            reporter.finish();
            summarize(&generated, &device, &reporter);
            if args.json {
                print_line(&result_json(&run_info, path, request, &generated).to_string());
            } else {
                print_line(&path.display().to_string());
            }
            Ok(())
        },
    )
}

/// `--config-from-metadata PNG`: the job recorded in the PNG, where an option given on the
/// command line wins over the recorded value. Warns when this run cannot give the same image:
/// another model, or a reference file whose content changed since (its recorded SHA-256).
fn job_from_metadata(
    png: &Path,
    args: &GenerateArgs,
    reporter: &mut Reporter,
) -> Result<PromptJob> {
    let text = flux2_klein::image_io::read_png_text(png)?;
    let mut job = PromptJob::from_metadata(&text)
        .map_err(|e| anyhow::anyhow!("--config-from-metadata {}: {e}", png.display()))?;
    if args.seed.is_some() {
        job.seed = None;
    }
    if args.width.is_some() {
        job.width = None;
    }
    if args.height.is_some() {
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

    let model = args.model.source.model_id();
    if let Some(recorded) = metadata_value(&text, "model").filter(|m| *m != model) {
        reporter.warn(&format!(
            "{} was made with the model {recorded}; this run uses {model} (pass -m {recorded} \
             to make the same image)",
            png.display()
        ));
    }
    if args.refs.is_empty() {
        let lines = |key| metadata_value(&text, key).map_or(vec![], |v| v.lines().collect());
        for (name, hash) in lines("references").iter().zip(lines("references_sha256")) {
            let now = flux2_klein::image_io::sha256_file(name).ok();
            if now.as_deref() != Some(hash) {
                reporter.warn(&format!(
                    "the reference {name} is missing or changed since {} was made, so the \
                     image will differ",
                    png.display()
                ));
            }
        }
    }
    Ok(job)
}

/// Seeds a user can type back: 0 ..= u32::MAX (any u64 is accepted by `--seed`).
fn random_seed() -> u64 {
    rand::random::<u32>() as u64
}

pub(super) fn warn_many_refs(n: usize, reporter: &mut Reporter) {
    if n > TRAINED_MAX_REFS {
        reporter.warn(&format!(
            "{n} reference images given; FLUX.2 [klein] was trained with up to \
             {TRAINED_MAX_REFS}, so results may degrade"
        ));
    }
}

/// diffusers floors sizes to multiples of 16 (vae_scale_factor·2) with a warning (spec §8);
/// we floor up front so the warning names the option and the size actually used.
pub(super) fn floor_to_16(
    name: &str,
    value: Option<u32>,
    reporter: &mut Reporter,
) -> Option<usize> {
    value.map(|v| {
        let floored = floor_to_multiple_of_16(v as usize) as u32;
        if floored != v {
            reporter.warn(&format!(
                "--{name} {v} is not a multiple of 16; using {floored}"
            ));
        }
        floored as usize
    })
}

/// Resolves the model and loads the pipeline; returns it with the steps and guidance to use
/// (the checkpoint's defaults unless given), warning when guidance will be ignored.
pub(super) fn load_pipeline(
    model: &ModelArgs,
    sampling: &SamplingArgs,
    options: PipelineOptions,
    reporter: &mut Reporter,
) -> Result<(Pipeline, usize, f64)> {
    let dir = model.source.resolve()?;
    let pipeline = Pipeline::open(dir, options)?;
    let steps = sampling
        .steps
        .map(|s| s as usize)
        .unwrap_or_else(|| pipeline.default_steps());
    let guidance = sampling
        .guidance
        .unwrap_or_else(|| pipeline.default_guidance());
    warn_ignored_guidance(&pipeline, guidance, reporter);
    Ok((pipeline, steps, guidance))
}

/// diffusers: "Guidance scale {g} is ignored for step-wise distilled models." (spec §8).
fn warn_ignored_guidance(pipeline: &Pipeline, guidance: f64, reporter: &mut Reporter) {
    if pipeline.is_distilled() && guidance > 1.0 {
        reporter.warn(&format!(
            "--guidance {guidance} is ignored: {} is a step-wise distilled model, which never \
             runs classifier-free guidance",
            pipeline.model.id
        ));
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
    vae_dtype: Option<&'static str>,
    /// SHA-256 of each reference file's content, by reference name.
    ref_sha256: HashMap<String, String>,
}

impl RunInfo {
    fn of(pipeline: &Pipeline, ref_sha256: HashMap<String, String>) -> Self {
        let o = &pipeline.options;
        Self {
            distilled: pipeline.is_distilled(),
            model: pipeline.model.id.clone(),
            revision: pipeline.model.revision.clone(),
            device: device_name(&o.device),
            dtype: dtype_name(o.dtype),
            vae_dtype: o.vae_dtype.map(dtype_name),
            ref_sha256,
        }
    }
}

/// The parameters needed to reproduce the image (PNG text chunks).
fn metadata(run: &RunInfo, request: &Request, generated: &Generated) -> Vec<(String, String)> {
    let mut meta = vec![("prompt".to_string(), request.prompt.clone())];
    if uses_cfg(run.distilled, generated.guidance) && !request.negative_prompt.is_empty() {
        meta.push((
            "negative_prompt".to_string(),
            request.negative_prompt.clone(),
        ));
    }
    meta.extend([
        ("seed".to_string(), generated.seed.to_string()),
        ("steps".to_string(), generated.steps.to_string()),
        ("guidance".to_string(), generated.guidance.to_string()),
        (
            "size".to_string(),
            format!("{}x{}", generated.width, generated.height),
        ),
        ("model".to_string(), run.model.clone()),
    ]);
    if let Some(rev) = &run.revision {
        meta.push(("revision".to_string(), rev.clone()));
    }
    if !request.references.is_empty() {
        let names: Vec<&str> = request.references.iter().map(|r| r.name.as_str()).collect();
        meta.push(("references".to_string(), names.join("\n")));
        // Content hashes, so a golden image records exactly which inputs made it.
        let hashes: Vec<&str> = names.iter().map(|n| run.ref_sha256[*n].as_str()).collect();
        meta.push(("references_sha256".to_string(), hashes.join("\n")));
    }
    meta.push(("device".to_string(), run.device.clone()));
    meta.push(("dtype".to_string(), run.dtype.to_string()));
    if let Some(v) = run.vae_dtype {
        meta.push(("vae_dtype".to_string(), v.to_string()));
    }
    meta.push((
        "software".to_string(),
        format!("flux2-klein {}", env!("CARGO_PKG_VERSION")),
    ));
    meta
}

fn summarize(g: &Generated, device: &Device, reporter: &Reporter) {
    let t = &g.timings;
    reporter.info(&format!(
        "{}{}×{}, {} steps, seed {}, {}",
        reporter.job_prefix(),
        g.width,
        g.height,
        g.steps,
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

/// The image's line on stdout (its path, or with `--json` its record), the only thing
/// written there (scripts capture it). A closed stdout is not an error: the image is already
/// written.
fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The `--json` record of one written image.
fn result_json(
    run: &RunInfo,
    path: &Path,
    request: &Request,
    generated: &Generated,
) -> serde_json::Value {
    let t = &generated.timings;
    // Milliseconds to the microsecond.
    let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    serde_json::json!({
        "path": path.display().to_string(),
        "prompt": request.prompt,
        "negative_prompt": uses_cfg(run.distilled, generated.guidance)
            .then_some(&request.negative_prompt),
        "seed": generated.seed,
        "width": generated.width,
        "height": generated.height,
        "steps": generated.steps,
        "guidance": generated.guidance,
        "references": request.references.iter().map(|r| &r.name).collect::<Vec<_>>(),
        "model": run.model,
        "revision": run.revision,
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
