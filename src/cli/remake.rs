//! `generate --config-from-metadata IMAGE`: the job recorded in an image flux2-klein wrote,
//! the recorded model settings re-applied where the command line gives none, recorded paths
//! found again, and warnings when this run cannot give the same pixels.

use std::path::Path;

use anyhow::Result;

use super::args::{DTypeArg, GenerateArgs, ModelArgs, QuantizeArg};
use super::device::{device_name, dtype_name};
use super::jobs::PromptJob;
use super::metadata::{resolve_recorded_path, Recorded};
use super::progress::Reporter;

/// `--config-from-metadata IMAGE`: the job recorded in the image, and the arguments with the
/// recorded model, revision, dtypes and VAE tiling filled in where the command line gave none
/// (an option given on the command line wins over the recorded value). Recorded paths are
/// looked for next to the image first ([`resolve_recorded_path`]). Warns when this run cannot
/// give the same image: another model, or a reference file missing or changed since (its
/// recorded SHA-256).
pub fn job_from_metadata(
    png: &Path,
    args: &GenerateArgs,
    reporter: &mut Reporter,
) -> Result<(PromptJob, GenerateArgs, Recorded)> {
    let mut recorded = Recorded::read(png)?;
    let refs: Vec<String> = recorded
        .references
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let sha = recorded.references_sha256.get(i).map(String::as_str);
            resolve_recorded_path(png, name, sha)
        })
        .collect();
    recorded.references = refs;
    if let Some(name) = &recorded.init_image {
        recorded.init_image = Some(resolve_recorded_path(
            png,
            name,
            recorded.init_image_sha256.as_deref(),
        ));
    }
    if let Some(name) = &recorded.mask {
        recorded.mask = Some(resolve_recorded_path(
            png,
            name,
            recorded.mask_sha256.as_deref(),
        ));
    }
    // A local adapter file is looked for next to the image too; a hub name stays as recorded.
    for (i, lora) in recorded.loras.iter_mut().enumerate() {
        let sha = recorded.loras_sha256.get(i).map(String::as_str);
        let found = resolve_recorded_path(png, &lora.source, sha);
        if Path::new(&found).is_file() {
            lora.source = found;
        }
    }
    let applied = with_recorded_model(args, &recorded, png)?;
    let args = &applied;
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
    Ok((job, applied, recorded))
}

/// `args` with the recorded model (and its revision), dtype, VAE dtype and VAE tile size where
/// the command line gave none.
fn with_recorded_model(
    args: &GenerateArgs,
    recorded: &Recorded,
    image: &Path,
) -> Result<GenerateArgs> {
    let mut applied = args.clone();
    let m = &mut applied.model;
    if !args.model.source.model_given() {
        if let Some(model) = &recorded.model {
            // A local model recorded by a relative path may be next to the image.
            let beside = image.parent().map(|d| d.join(model));
            let local = Path::new(model).is_dir() || Path::new(model).is_absolute();
            m.source.model = Some(match beside {
                Some(b) if !local && b.join("model_index.json").is_file() => {
                    b.display().to_string()
                }
                _ => model.clone(),
            });
            if args.model.source.revision.is_none() {
                m.source.revision = recorded.revision.clone();
            }
        }
    }
    let dtype = |what: &str, v: &str| {
        <DTypeArg as clap::ValueEnum>::from_str(v, true).map_err(|_| {
            anyhow::anyhow!(
                "--config-from-metadata {}: its {what} {v:?} is not bf16 or f32",
                image.display()
            )
        })
    };
    if m.dtype.is_none() {
        m.dtype = recorded
            .dtype
            .as_deref()
            .map(|v| dtype("dtype", v))
            .transpose()?;
    }
    if m.vae_dtype.is_none() {
        m.vae_dtype = recorded
            .vae_dtype
            .as_deref()
            .map(|v| dtype("vae_dtype", v))
            .transpose()?;
    }
    if m.vae_tile.is_none() {
        m.vae_tile = recorded.vae_tile;
    }
    Ok(applied)
}

/// A warning when this run computes on another device or in another dtype than the image was
/// made with: the pixels will differ (bf16 and f32, CPU and GPU round differently).
pub fn warn_other_device(
    recorded: &Recorded,
    image: &Path,
    options: &flux2_klein::pipeline::PipelineOptions,
    reporter: &mut Reporter,
) {
    let device = device_name(&options.device);
    let dtype = dtype_name(options.dtype);
    let other_device = recorded.device.as_deref().filter(|d| *d != device);
    let other_dtype = recorded.dtype.as_deref().filter(|d| *d != dtype);
    if other_device.is_some() || other_dtype.is_some() {
        reporter.warn(&format!(
            "{} was made on {} in {}; this run uses {device} in {dtype}, so the pixels will \
             differ slightly (pass --device {} --dtype {} to match)",
            image.display(),
            recorded.device.as_deref().unwrap_or("?"),
            recorded.dtype.as_deref().unwrap_or("?"),
            recorded.device.as_deref().unwrap_or(&device),
            recorded.dtype.as_deref().unwrap_or(dtype),
        ));
    }
}

/// The transformer file and quantisation recorded in `png`, put into `model` where the
/// command line gave none. A recorded file that is missing or changed (its SHA-256) is
/// warned about; a missing one is not used.
pub fn recorded_weights(png: &Path, model: &mut ModelArgs, reporter: &mut Reporter) -> Result<()> {
    let recorded = Recorded::read(png)?;
    if model.quantize.is_none() && recorded.quantize.as_deref() == Some("fp8") {
        model.quantize = Some(QuantizeArg::Fp8);
    }
    let name = match (&model.transformer, recorded.transformer) {
        // A recorded path is found next to the image first, as references are.
        (None, Some(name)) => {
            resolve_recorded_path(png, &name, recorded.transformer_sha256.as_deref())
        }
        (Some(given), Some(made_with)) if *given != made_with => {
            reporter.warn(&format!(
                "{} was made with the transformer file {made_with}; this run uses {given}",
                png.display()
            ));
            return Ok(());
        }
        _ => return Ok(()),
    };
    match flux2_klein::weights::resolve::transformer_file(&name) {
        Ok(path) => {
            let changed = recorded.transformer_sha256.as_ref().is_some_and(|hash| {
                flux2_klein::image_io::sha256_file(&path).is_ok_and(|now| now != *hash)
            });
            if changed {
                reporter.warn(&format!(
                    "the transformer file {name} has changed (another SHA-256) since {}, so                      the image will differ",
                    png.display()
                ));
            }
            model.transformer = Some(name);
        }
        Err(_) => reporter.warn(&format!(
            "the transformer file {name} is missing, recorded in {}; using the model's own              transformer, so the image will differ",
            png.display()
        )),
    }
    Ok(())
}
