//! The library's ceilings (`flux2_klein::limits`) applied to a whole `generate` run before
//! anything loads: every job, wherever its values come from (flags, a prompt-file line, the
//! PNG metadata of `--config-from-metadata`), gets the same checks as the flags, and errors
//! say where the value came from.

use anyhow::{anyhow, Result};
use flux2_klein::image_io::prepared_reference_size;
use flux2_klein::limits::{self, MAX_IMAGES_PER_RUN};

use super::args::GenerateArgs;
use super::common::floor_side;
use super::jobs::PromptJob;
use super::references::Loaded;

/// Where a job's values came from, as a message prefix.
fn origin(job: &PromptJob, args: &GenerateArgs) -> String {
    match (
        job.line,
        &args.prompt.prompt_file,
        &args.prompt.config_from_metadata,
    ) {
        (Some(line), Some(file), _) => format!("prompt file {} line {line}: ", file.display()),
        (_, _, Some(png)) => format!("--config-from-metadata {}: ", png.display()),
        _ => String::new(),
    }
}

/// The counts of a run (images = jobs × `--count`, references per image) and each job's own
/// values, before the images are planned.
pub fn check_jobs(jobs: &[PromptJob], args: &GenerateArgs) -> Result<()> {
    let images = jobs.len().saturating_mul(args.count as usize);
    if images > MAX_IMAGES_PER_RUN {
        return Err(anyhow!(
            "{} × {} = {images} images is more than the {MAX_IMAGES_PER_RUN} allowed in one \
             run — split the prompt file or lower -n",
            jobs.len(),
            args.count
        ));
    }
    for job in jobs {
        job.check()
            .map_err(|e| anyhow!("{}{e}", origin(job, args)))?;
        limits::check_reference_count(job.refs(&args.refs).len())
            .map_err(|e| anyhow!("{}{e} — use fewer references", origin(job, args)))?;
        limits::check_adapter_count(job.loras(&args.sampling.loras).len())
            .map_err(|e| anyhow!("{}{e} — use fewer --lora", origin(job, args)))?;
    }
    let files: std::collections::BTreeSet<&str> = jobs
        .iter()
        .flat_map(|j| j.loras(&args.sampling.loras))
        .map(|l| l.source.as_str())
        .collect();
    if files.len() > limits::MAX_ADAPTER_FILES_PER_RUN {
        return Err(anyhow!(
            "{} distinct LoRA files is more than the {} one run reads — split the prompt file",
            files.len(),
            limits::MAX_ADAPTER_FILES_PER_RUN
        ));
    }
    Ok(())
}

/// Each job's output size (as the pipeline resolves it: the job's, else `-W/-H`, else the
/// first reference's prepared size, else 1024², floored to 16) against `--max-area`.
pub fn check_sizes(jobs: &[&PromptJob], args: &GenerateArgs, references: &Loaded) -> Result<()> {
    let max_area = args.sampling.max_area_px();
    for &job in jobs {
        // An init image sets the size (shrunk to at most 1024², checked by the pipeline).
        if job.init_image.is_some() || args.inpaint.init_image.is_some() {
            continue;
        }
        let refs = job.refs(&args.refs);
        let (dw, dh) = match refs.first() {
            Some(first) => {
                let image = &references.get(std::slice::from_ref(first))[0].image;
                prepared_reference_size(image.width(), image.height())
            }
            None => (1024, 1024),
        };
        let side = |own: Option<u32>, flag: Option<u32>, default: u32| {
            floor_side(own.or(flag).unwrap_or(default)) as usize
        };
        let w = side(job.width, args.width, dw);
        let h = side(job.height, args.height, dh);
        limits::check_output_size(w, h, max_area)
            .map_err(|e| anyhow!("{}{e}", origin(job, args)))?;
    }
    Ok(())
}
