//! The init images and masks of `generate --init-image` (inpainting and image-to-image): each
//! job's paths and settings (its prompt-file line's, else the flags'), each file read, checked
//! and hashed once for the whole run.

use std::path::{Path, PathBuf};

use anyhow::Result;
use flux2_klein::pipeline::inpaint::DEFAULT_STRENGTH;
use flux2_klein::pipeline::InitImage;

use super::args::GenerateArgs;
use super::jobs::PromptJob;

/// The init image, mask, strength and crop of a job (its own, else the flags').
#[derive(Debug, Clone)]
pub(super) struct InitPaths {
    pub(super) init: PathBuf,
    pub(super) mask: Option<PathBuf>,
    strength: f64,
    padding_mask_crop: Option<u32>,
    /// Where the init image's and the mask's paths came from, for messages ("the path given
    /// to --init-image", "the \"mask\" path on line 3 of p.txt …").
    init_from: String,
    mask_from: String,
}

/// Where a job's `key` path came from: its own (a prompt-file line, PNG metadata), else `flag`.
fn path_origin(job: &PromptJob, args: &GenerateArgs, own: bool, key: &str, flag: &str) -> String {
    let p = &args.prompt;
    match (own, job.line, &p.prompt_file, &p.config_from_metadata) {
        (true, Some(line), Some(file), _) => format!(
            "the \"{key}\" path on line {line} of {} (relative to that file's directory)",
            file.display()
        ),
        (true, _, _, Some(png)) => format!("the {key} recorded in {}", png.display()),
        _ => format!("the path given to {flag}"),
    }
}

impl InitPaths {
    /// `None` without an init image; errors for options that need one, or that conflict.
    pub(super) fn of(job: &PromptJob, args: &GenerateArgs) -> Result<Option<Self>> {
        let a = &args.inpaint;
        let init = job.init_image.as_ref().or(a.init_image.as_ref());
        let mask = job.mask.as_ref().or(a.mask.as_ref());
        let strength = job.strength.or(a.strength);
        let pad = job.padding_mask_crop.or(a.padding_mask_crop);
        let Some(init) = init else {
            if mask.is_some() {
                anyhow::bail!(
                    "--mask needs --init-image (the image whose white mask area is repainted)"
                );
            }
            if strength.is_some() {
                anyhow::bail!(
                    "--strength needs --init-image (it sets how much of that image is repainted)"
                );
            }
            if pad.is_some() {
                anyhow::bail!("--padding-mask-crop needs --init-image and --mask");
            }
            return Ok(None);
        };
        if pad.is_some() && mask.is_none() {
            anyhow::bail!(
                "--padding-mask-crop needs --mask (it crops around the mask's white area)"
            );
        }
        if job.width.or(args.width).is_some() || job.height.or(args.height).is_some() {
            anyhow::bail!(
                "--width/--height cannot be combined with --init-image: the output has the init \
                 image's size (floored to a multiple of 16), as in diffusers"
            );
        }
        let strength = strength.unwrap_or(DEFAULT_STRENGTH);
        // Fails only for a strength of (nearly) 0, whatever the steps: checked before the
        // model loads with the job's steps, else the smallest default (4).
        let steps = job.steps.or(args.sampling.steps).unwrap_or(4) as usize;
        flux2_klein::pipeline::inpaint::t_start(steps, strength)?;
        Ok(Some(Self {
            init: init.clone(),
            mask: mask.cloned(),
            strength,
            padding_mask_crop: pad,
            init_from: path_origin(
                job,
                args,
                job.init_image.is_some(),
                "init_image",
                "--init-image",
            ),
            mask_from: path_origin(job, args, job.mask.is_some(), "mask", "--mask"),
        }))
    }
}

/// The init images and masks of a run, each file decoded and hashed once.
#[derive(Default)]
pub(super) struct InitImages {
    by_path: std::collections::HashMap<PathBuf, flux2_klein::pipeline::Reference>,
    /// SHA-256 of each file's content, by name.
    pub(super) sha256: std::collections::HashMap<String, String>,
}

impl InitImages {
    pub(super) fn add(&mut self, init: &InitPaths) -> Result<()> {
        self.load(&init.init, "init image", &init.init_from)?;
        if let Some(mask) = &init.mask {
            self.load(mask, "mask", &init.mask_from)?;
        }
        Ok(())
    }

    /// Loads `path` (the `what`, whose path came `from`) unless it is loaded already.
    fn load(&mut self, path: &Path, what: &str, from: &str) -> Result<()> {
        if self.by_path.contains_key(path) {
            return Ok(());
        }
        let name = path.display().to_string();
        if !path.exists() {
            anyhow::bail!("{what} {name} does not exist — check {from}");
        }
        if path.is_dir() {
            anyhow::bail!("{what} {name} is a directory — pass one image file ({from})");
        }
        // Decoded and hashed from one read of the file.
        let (image, hash) = flux2_klein::image_io::load_image_hashed(path).map_err(|e| {
            if path.is_file() {
                anyhow::anyhow!(
                    "cannot decode {what} {name} ({}) — use a PNG, JPEG or WebP file",
                    e.root_cause()
                )
            } else {
                anyhow::anyhow!("{what} {name}: {} ({from})", e.root_cause())
            }
        })?;
        if what == "init image" {
            flux2_klein::pipeline::inpaint::check_init_size(image.width(), image.height())
                .map_err(|e| anyhow::anyhow!("init image {name} is {e} — upscale it first"))?;
        }
        self.sha256.insert(name.clone(), hash);
        self.by_path.insert(
            path.to_path_buf(),
            flux2_klein::pipeline::Reference {
                image: std::sync::Arc::new(image),
                name,
            },
        );
        Ok(())
    }

    pub(super) fn request(&self, init: &InitPaths) -> InitImage {
        let image = self.by_path[&init.init].clone();
        InitImage {
            image: image.image,
            name: image.name,
            mask: init.mask.as_ref().map(|m| self.by_path[m].clone()),
            strength: init.strength,
            padding_mask_crop: init.padding_mask_crop,
        }
    }
}
