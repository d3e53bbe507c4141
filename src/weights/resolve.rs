//! `--transformer PATH_OR_REPO`: a local `.safetensors` file, or a Hugging Face repo id whose
//! repo holds exactly one `.safetensors` file (BFL's fp8 repos: one weights file, no config).
//! Hub access as for `--model` (`HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`: offline, the repo's
//! snapshot in the cache is listed instead).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// The local path of the checkpoint `spec` names (downloaded into the HF cache when needed).
pub fn transformer_file(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        bail!(
            "--transformer {spec} is a directory; pass the .safetensors file itself (a diffusers \
             directory goes to --model)"
        );
    }
    let is_repo_id = spec.matches('/').count() == 1
        && !spec.starts_with(['.', '/', '~'])
        && !spec.ends_with(".safetensors");
    if !is_repo_id {
        bail!(
            "--transformer {spec} does not exist; pass a .safetensors file or a Hugging Face repo \
             id holding one (e.g. black-forest-labs/FLUX.2-klein-4b-fp8)"
        );
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v != "0" && !v.is_empty());
    let names = if offline {
        cached_safetensors(spec)?
    } else {
        hub_safetensors(spec)?
    };
    let name = match names.as_slice() {
        [one] => one.clone(),
        [] => bail!("the Hugging Face repo {spec} holds no .safetensors file"),
        many => bail!(
            "the Hugging Face repo {spec} holds {} .safetensors files ({}); pass the one to use \
             as a local path",
            many.len(),
            many.join(", ")
        ),
    };
    if offline {
        return hf_hub::Cache::from_env()
            .model(spec.to_string())
            .get(&name)
            .ok_or_else(|| anyhow!("{name} of {spec} is not in the Hugging Face cache"));
    }
    api()?
        .model(spec.to_string())
        .get(&name)
        .map_err(|e| anyhow!("cannot fetch {name} of {spec} from the Hugging Face hub: {e}"))
}

fn api() -> Result<hf_hub::api::sync::Api> {
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| hf_hub::Cache::from_env().token());
    hf_hub::api::sync::ApiBuilder::from_env()
        .with_token(token)
        .build()
        .context("setting up the Hugging Face hub client")
}

fn hub_safetensors(repo: &str) -> Result<Vec<String>> {
    let info = api()?.model(repo.to_string()).info().map_err(|e| {
        anyhow!(
            "cannot list the Hugging Face repo {repo} ({e}); check the repo id, HF_TOKEN for \
             gated repos, or pass a local .safetensors file"
        )
    })?;
    Ok(info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|n| n.ends_with(".safetensors"))
        .collect())
}

/// The `.safetensors` files of the cached snapshot of `repo` (main).
fn cached_safetensors(repo: &str) -> Result<Vec<String>> {
    let root = hf_hub::Cache::from_env().path().clone();
    let folder = root.join(format!("models--{}", repo.replace('/', "--")));
    let commit = std::fs::read_to_string(folder.join("refs").join("main")).map_err(|_| {
        anyhow!(
            "{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it \
             first or pass a local .safetensors file"
        )
    })?;
    let snapshot = folder.join("snapshots").join(commit.trim());
    let mut names: Vec<String> = std::fs::read_dir(&snapshot)
        .with_context(|| format!("reading {}", snapshot.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    Ok(names)
}
