//! LoRA and LoKr adapters for the transformer, read as diffusers 0.42.1's
//! `Flux2LoraLoaderMixin` reads them (spec-wave2 §1) and merged into the weights at load
//! (`W + s·ΔW` in f32 on the device, then cast), so a denoising step costs the same with or
//! without adapters.
//!
//! * [`formats`]: the key layouts (diffusers/peft, ai-toolkit, BFL-PEFT; kohya and LoKr in
//!   their own files) → per-module deltas;
//! * [`read`]: the file (safetensors, size cap, diffusers' metadata) and the checks against
//!   the model (names, ranks, shapes) before anything loads;
//! * [`merge`]: the `VarBuilder` backend that adds the deltas as each weight loads.
//!
//! A [`Request`](crate::Request) lists its adapters ([`AppliedLora`]: a [`Lora`] and its
//! scale); the pipeline reloads the transformer when the next request's set differs.

pub mod formats;
mod kohya;
mod lokr;
pub mod merge;
pub mod read;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

pub use formats::{Delta, LoraFormat};
use read::PeftConfig;

use crate::transformer::Flux2TransformerConfig;

/// An adapter as the user names it: `PATH[:SCALE]` (a local file, `owner/repo/file` or
/// `hf://owner/repo/file` on the hub), the scale 1 by default.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub source: String,
    pub scale: f64,
}

impl LoraSpec {
    /// Parses `PATH[:SCALE]`. A suffix after the last `:` that holds no `/` is the scale and
    /// must be a finite number.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let (source, scale) = match s.rsplit_once(':') {
            Some((path, tail)) if !tail.contains('/') && !path.is_empty() => {
                let scale: f64 = tail.trim().parse().map_err(|_| {
                    format!("the scale {tail:?} in {s:?} is not a number (PATH[:SCALE], e.g. style.safetensors:0.8)")
                })?;
                (path, scale)
            }
            _ => (s, 1.0),
        };
        Self::new(source, scale)
    }

    /// A spec with a checked scale.
    pub fn new(source: &str, scale: f64) -> std::result::Result<Self, String> {
        if source.is_empty() {
            return Err("the LoRA path is empty (PATH[:SCALE])".into());
        }
        if !scale.is_finite() {
            return Err(format!(
                "the LoRA scale of {source} is {scale}; it must be a finite number"
            ));
        }
        Ok(Self {
            source: source.to_string(),
            scale,
        })
    }
}

/// A read and checked adapter file.
#[derive(Debug)]
pub struct Lora {
    /// The name it was given by (path or hub id), for messages and metadata.
    pub label: String,
    /// The local file (in the hub cache for hub files).
    pub path: PathBuf,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
    pub format: LoraFormat,
    /// Diffusers module (`transformer_blocks.0.attn.to_q`) → its delta.
    modules: BTreeMap<String, Arc<Delta>>,
    config: PeftConfig,
}

impl Lora {
    /// Reads `source` (a local file, else a hub file) and checks it against the transformer
    /// `cfg`; what diffusers skips is reported through [`crate::ops::warn`].
    pub fn open(source: &str, cfg: &Flux2TransformerConfig) -> Result<Self> {
        let path = resolve(source)?;
        Self::open_file(&path, source, cfg)
    }

    /// Reads a local file, named `label` in messages.
    pub fn open_file(path: &Path, label: &str, cfg: &Flux2TransformerConfig) -> Result<Self> {
        let mut warnings = vec![];
        let (converted, config, sha256) =
            read::read_adapter(path, label, cfg, &mut |w| warnings.push(w))?;
        for w in warnings {
            crate::ops::warn(w);
        }
        Ok(Self {
            label: label.to_string(),
            path: path.to_path_buf(),
            sha256,
            format: converted.format,
            modules: converted
                .modules
                .into_iter()
                .map(|(k, v)| (k, Arc::new(v)))
                .collect(),
            config,
        })
    }

    /// The file name as shown in metadata: the label's last path component.
    pub fn file_name(&self) -> &str {
        self.label.rsplit('/').next().unwrap_or(&self.label)
    }

    /// The modules the adapter changes.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// The file's own scale of a module (peft's `lora_alpha / r` from diffusers' metadata;
    /// 1 without metadata).
    fn module_scale(&self, module: &str) -> f64 {
        self.config.module(module).1
    }
}

/// An adapter with the scale it is applied at (diffusers' `set_adapters(…, adapter_weights)`).
#[derive(Debug, Clone)]
pub struct AppliedLora {
    pub lora: Arc<Lora>,
    pub scale: f64,
}

impl PartialEq for AppliedLora {
    fn eq(&self, other: &Self) -> bool {
        self.scale == other.scale
            && (Arc::ptr_eq(&self.lora, &other.lora)
                || (self.lora.path == other.lora.path && self.lora.sha256 == other.lora.sha256))
    }
}

/// A local file if one exists at `source`; else `hf://owner/repo/file` or `owner/repo/file`
/// fetched into the Hugging Face cache (as models are: `HF_HOME`, `HF_TOKEN`,
/// `HF_HUB_OFFLINE`).
pub fn resolve(source: &str) -> Result<PathBuf> {
    let path = Path::new(source);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let hub = source.strip_prefix("hf://");
    let rel = hub.unwrap_or(source);
    let parts: Vec<&str> = rel.splitn(3, '/').collect();
    let looks_local = source.starts_with('.') || source.starts_with('/') || source.starts_with('~');
    if parts.len() < 3 || (hub.is_none() && looks_local) {
        bail!(
            "LoRA file {source} does not exist (pass a local .safetensors file, or a hub file as \
             owner/repo/file.safetensors or hf://owner/repo/file.safetensors)"
        );
    }
    let (repo_id, file) = (format!("{}/{}", parts[0], parts[1]), parts[2]);
    hub_file(&repo_id, file)
}

fn hub_file(repo_id: &str, file: &str) -> Result<PathBuf> {
    let repo = hf_hub::Repo::model(repo_id.to_string());
    if let Some(p) = hf_hub::Cache::from_env().repo(repo.clone()).get(file) {
        return Ok(p);
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v != "0" && !v.is_empty());
    if offline {
        bail!(
            "LoRA file {file} of {repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE \
             is set; download it first or pass a local file"
        );
    }
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| hf_hub::Cache::from_env().token());
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_token(token)
        .build()
        .context("setting up the Hugging Face hub client")?;
    api.repo(repo)
        .get(file)
        .map_err(|e| anyhow!("cannot fetch LoRA file {file} from {repo_id}: {e}"))
}

/// A `VarBuilder` over `inner` (the checkpoint's weights, or a dequantising backend over
/// them) that adds the adapters' deltas as each targeted weight loads, and the set of targeted
/// weights not loaded yet ([`check_all_merged`] after the load).
pub fn merging_var_builder(
    inner: Box<dyn SimpleBackend>,
    adapters: &[AppliedLora],
    dtype: DType,
    device: &Device,
) -> (VarBuilder<'static>, Arc<Mutex<BTreeSet<String>>>) {
    let (backend, pending) = merge::MergingBackend::new(inner, adapters);
    (
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
        pending,
    )
}

/// Fails when some targeted weight was never loaded (the model has no such weight).
pub fn check_all_merged(pending: &Mutex<BTreeSet<String>>) -> Result<()> {
    let left: Vec<String> = pending
        .lock()
        .map(|p| p.iter().cloned().collect())
        .unwrap_or_default();
    if !left.is_empty() {
        bail!(
            "the adapters target {} which the transformer does not load",
            formats::first_keys(&left)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s = LoraSpec::parse("a.safetensors:0.5").unwrap();
        assert_eq!((s.source.as_str(), s.scale), ("a.safetensors", 0.5));
        let s = LoraSpec::parse("hf://o/r/a.safetensors").unwrap();
        assert_eq!(
            (s.source.as_str(), s.scale),
            ("hf://o/r/a.safetensors", 1.0)
        );
        let s = LoraSpec::parse("hf://o/r/a.safetensors:-1").unwrap();
        assert_eq!(s.scale, -1.0);
        assert!(LoraSpec::parse("a.safetensors:nan").is_err());
        assert!(LoraSpec::parse("a.safetensors:inf").is_err());
        assert!(LoraSpec::parse("a.safetensors:x").is_err());
        assert!(LoraSpec::parse("").is_err());
    }
}
