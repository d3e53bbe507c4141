//! Where the weights come from: a Hugging Face repo id (through hf-hub, with the standard cache,
//! `HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`) or a local directory, both in the diffusers layout:
//!
//! ```text
//! model_index.json
//! scheduler/scheduler_config.json
//! text_encoder/config.json + model.safetensors | model.safetensors.index.json (+ shards)
//! tokenizer/tokenizer.json
//! transformer/config.json + diffusion_pytorch_model.safetensors | *.safetensors.index.json
//! vae/config.json + diffusion_pytorch_model.safetensors
//! ```
//!
//! Every shape comes from the json configs, so variants (klein base, 9B) load the same way.

mod hub;
mod weight_file;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::Deserialize;

pub use hub::check_revision;
pub use weight_file::{check_header as check_weight_header, check_weight_file, WeightFileSummary};

/// The default model: the distilled 4B klein checkpoint in diffusers layout.
pub const DEFAULT_MODEL: &str = "black-forest-labs/FLUX.2-klein-4B";

/// `model_index.json`: only the keys the pipeline reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Distilled checkpoints (klein 4B/9B) never run CFG; base checkpoints do (spec §8).
    #[serde(default)]
    pub is_distilled: bool,
}

/// Which diffusers pipeline a checkpoint is for (`model_index.json` `_class_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    /// `Flux2KleinPipeline` (the published klein repos) or `Flux2KleinInpaintPipeline` (the same
    /// components saved from diffusers' inpainting pipeline): references joined to the image
    /// tokens at every step.
    Klein,
    /// `Flux2KleinKVPipeline` (FLUX.2-klein-9b-kv, spec-wave2 §3): the reference tokens' K/V
    /// computed once and reused at every step.
    KleinKv,
}

impl PipelineKind {
    /// The `_class_name`s this port runs, in the order messages list them.
    pub const SUPPORTED: [&'static str; 3] = [
        "Flux2KleinPipeline",
        "Flux2KleinKVPipeline",
        "Flux2KleinInpaintPipeline",
    ];

    /// The kind of a `_class_name`; anything else is an error naming the supported ones.
    pub fn from_class_name(class_name: Option<&str>) -> Result<Self> {
        match class_name {
            Some("Flux2KleinPipeline" | "Flux2KleinInpaintPipeline") => Ok(Self::Klein),
            Some("Flux2KleinKVPipeline") => Ok(Self::KleinKv),
            Some(other) => bail!(
                "model_index.json names the pipeline {other}, which this program does not run; \
                 supported: {} (FLUX.2 [klein] checkpoints)",
                Self::SUPPORTED.join(", ")
            ),
            None => bail!(
                "model_index.json has no _class_name; expected one of {} (a diffusers-layout \
                 FLUX.2 [klein] checkpoint)",
                Self::SUPPORTED.join(", ")
            ),
        }
    }
}

impl ModelIndex {
    /// The pipeline the checkpoint is for ([`PipelineKind::from_class_name`]).
    pub fn kind(&self) -> Result<PipelineKind> {
        PipelineKind::from_class_name(self.class_name.as_deref())
    }
}

enum Source {
    Local(PathBuf),
    Hub {
        repo: Box<hub::HubRepo>,
        offline: bool,
    },
}

/// A resolved model: local directory or hub repo. Files are fetched (and cached) on first use.
pub struct ModelDir {
    source: Source,
    /// What the user asked for (repo id or path), for messages and image metadata.
    pub id: String,
    /// The revision asked for (hub only).
    pub revision: Option<String>,
    pub index: ModelIndex,
}

impl std::fmt::Debug for ModelDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelDir")
            .field("id", &self.id)
            .field("revision", &self.revision)
            .field("index", &self.index)
            .finish()
    }
}

/// Whether hub downloads draw hf-hub's progress bars on stderr ([`show_download_progress`]).
static DOWNLOAD_PROGRESS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Hub downloads (the weights are ~16 GB) draw hf-hub's progress bars on stderr from now on;
/// off by default, for scripts. `flux2-klein fetch` turns it on when stderr is a terminal and
/// not `-q`.
pub fn show_download_progress(on: bool) {
    DOWNLOAD_PROGRESS.store(on, std::sync::atomic::Ordering::Relaxed);
}

impl ModelDir {
    /// `id`, or `id@revision` when a hub revision was asked for (for messages).
    pub fn label(&self) -> String {
        match &self.revision {
            Some(rev) => format!("{}@{rev}", self.id),
            None => self.id.clone(),
        }
    }

    /// `model` is a local directory if one exists at that path, else a hub repo id.
    pub fn resolve(model: &str, revision: Option<&str>) -> Result<Self> {
        let path = Path::new(model);
        if path.is_dir() {
            if revision.is_some() {
                bail!("--revision only applies to hub repos, but {model} is a local directory");
            }
            return Self::open_local(path);
        }
        if path.exists() {
            bail!("model {model} is a file; pass the directory that holds model_index.json");
        }
        if looks_like_path(model) {
            bail!(
                "model directory {model} does not exist; pass a local diffusers-layout directory \
                 or a Hugging Face repo id such as {DEFAULT_MODEL}"
            );
        }
        Self::open_hub(model, revision)
    }

    /// A local directory in the diffusers layout.
    pub fn open_local(root: &Path) -> Result<Self> {
        let index_path = root.join("model_index.json");
        if !index_path.is_file() {
            bail!(
                "{} has no model_index.json: pass a directory in the diffusers layout (or a hub repo id)",
                root.display()
            );
        }
        let index: ModelIndex = read_json(&index_path)?;
        index
            .kind()
            .with_context(|| format!("model {}", root.display()))?;
        Ok(Self {
            source: Source::Local(root.to_path_buf()),
            id: root.display().to_string(),
            revision: None,
            index,
        })
    }

    fn open_hub(repo_id: &str, revision: Option<&str>) -> Result<Self> {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| v != "0" && !v.is_empty())
            .unwrap_or(false);
        let progress = DOWNLOAD_PROGRESS.load(std::sync::atomic::Ordering::Relaxed);
        let repo = hub::HubRepo::new(repo_id, revision, progress)?;
        let mut dir = Self {
            source: Source::Hub {
                repo: Box::new(repo),
                offline,
            },
            id: repo_id.to_string(),
            revision: revision.map(str::to_string),
            index: ModelIndex {
                class_name: None,
                is_distilled: true,
            },
        };
        let index_path = dir.file("model_index.json")?;
        dir.index = read_json(&index_path)?;
        dir.index
            .kind()
            .with_context(|| format!("model {}", dir.label()))?;
        Ok(dir)
    }

    /// Path of one file of the model (downloaded into the HF cache when needed).
    pub fn file(&self, rel: &str) -> Result<PathBuf> {
        match &self.source {
            Source::Local(root) => {
                let p = root.join(rel);
                if p.is_file() {
                    Ok(p)
                } else {
                    bail!(
                        "{} is missing from the model directory {}",
                        rel,
                        root.display()
                    )
                }
            }
            Source::Hub { repo, offline } => {
                if let Some(p) = repo.cached(rel) {
                    return Ok(p);
                }
                if *offline {
                    bail!(
                        "{rel} of {} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; \
                         download it first or pass a local directory with --model DIR",
                        self.id
                    );
                }
                repo.download(rel).map_err(|e| hub_error(&self.id, rel, e))
            }
        }
    }

    /// Whether a file exists (locally or in the repo). Used to choose between a single file and
    /// a sharded index: a file the hub does not have is `false`, any other trouble (a broken
    /// transfer, a hostile answer) is the error.
    fn has_file(&self, rel: &str) -> Result<bool> {
        match &self.source {
            Source::Local(root) => Ok(root.join(rel).is_file()),
            Source::Hub { repo, offline } => {
                if repo.cached(rel).is_some() {
                    return Ok(true);
                }
                if *offline {
                    return Ok(false);
                }
                match self.file(rel) {
                    Ok(_) => Ok(true),
                    Err(e) if e.chain().any(|c| c.is::<hub::NotFound>()) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Reads, parses and validates the config of `component` (`{component}/config.json`, the
    /// scheduler's `scheduler/scheduler_config.json`); the error names the file.
    pub fn config<T: ComponentConfig>(&self, component: &str) -> Result<T> {
        let name = if component == "scheduler" {
            "scheduler/scheduler_config.json".to_string()
        } else {
            format!("{component}/config.json")
        };
        read_config(&self.file(&name)?)
    }

    /// A `VarBuilder` over the weights of `component` ([`Self::weights`]: the single file or
    /// every shard), converting them to `dtype` on `device`.
    pub fn var_builder(
        &self,
        component: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        let files = self.weights(component)?;
        var_builder(&files, dtype, device)
            .with_context(|| format!("loading the {component} weights of {}", self.id))
    }

    /// A component's weight files, checked ([`check_weight_file`]) and memory-mapped: the
    /// backend that wrapping backends (fp8 quantisation, LoRA merging) read through.
    pub fn mmaped(&self, component: &str) -> Result<MmapedSafetensors> {
        let files = self.weights(component)?;
        for f in &files {
            check_weight_file(f)?;
        }
        // SAFETY: the weight files are memory-mapped read-only and not modified while mapped.
        unsafe { MmapedSafetensors::multi(&files) }
            .with_context(|| format!("opening the {component} weights of {}", self.id))
    }

    /// The safetensors files of a component: the single file, or every shard named by the
    /// `*.safetensors.index.json`.
    pub fn weights(&self, component: &str) -> Result<Vec<PathBuf>> {
        let stems = ["diffusion_pytorch_model", "model"];
        for stem in stems {
            let single = format!("{component}/{stem}.safetensors");
            if self.has_file(&single)? {
                return Ok(vec![self.file(&single)?]);
            }
        }
        for stem in stems {
            let index = format!("{component}/{stem}.safetensors.index.json");
            if self.has_file(&index)? {
                let path = self.file(&index)?;
                let shards = shard_names(&path)?;
                return shards
                    .iter()
                    .map(|s| self.file(&format!("{component}/{s}")))
                    .collect();
            }
        }
        bail!(
            "no weights for {component} in {}: expected {component}/diffusion_pytorch_model.safetensors, \
             {component}/model.safetensors or a *.safetensors.index.json with its shards",
            self.id
        )
    }

    /// The tokenizer of the text encoder.
    pub fn tokenizer(&self) -> Result<PathBuf> {
        self.file("tokenizer/tokenizer.json")
    }
}

/// The distinct shard file names listed in a `*.safetensors.index.json` weight map.
fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::HashMap<String, String>,
    }
    let index: Index = read_json(index_path)?;
    let set: BTreeSet<String> = index.weight_map.into_values().collect();
    if set.is_empty() {
        bail!("{} lists no shards", index_path.display());
    }
    for name in &set {
        check_shard_name(name)
            .with_context(|| format!("invalid shard index {}", index_path.display()))?;
    }
    Ok(set.into_iter().collect())
}

/// A shard must be a file of the component's own directory: a name like `../../etc/passwd`
/// or an absolute path in a (downloaded) index must not reach files outside the model.
pub fn check_shard_name(name: &str) -> Result<()> {
    let plain = hub::check_rel_path(name).is_ok() && !name.contains('/');
    if !plain || !name.ends_with(".safetensors") {
        bail!(
            "shard {name:?} is not a .safetensors file name in the component's directory \
             (no directories, no '..', not absolute) — the index is damaged or hostile"
        );
    }
    Ok(())
}

/// A `VarBuilder` over memory-mapped safetensors files (a component's single file or its
/// shards), converting the weights to `dtype` on `device`.
pub fn var_builder(
    files: &[impl AsRef<Path>],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    for f in files {
        check_weight_file(f.as_ref())?;
    }
    // SAFETY: the weight files are memory-mapped read-only and not modified while mapped.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.with_context(|| {
        let names: Vec<String> = files
            .iter()
            .map(|f| f.as_ref().display().to_string())
            .collect();
        format!("opening {}", names.join(", "))
    })
}

/// Reads and parses a json file; the error names the file and what is wrong.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow!("{} is not a valid config: {e}", path.display()))
}

/// A component's `config.json` as a serde struct that can say whether this port supports it.
/// [`ModelDir::config`] and [`read_config`] are the one way configs are loaded.
pub trait ComponentConfig: DeserializeOwned {
    /// What the file is, for messages ("transformer config").
    const WHAT: &'static str;

    /// Rejects values the port does not implement or that contradict each other.
    fn validate(&self) -> Result<()>;
}

/// Any json: parsed, never validated (`fetch` reads configs this way to find their files).
impl ComponentConfig for serde_json::Value {
    const WHAT: &'static str = "config";

    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// Reads, parses and validates a config file; the error names the file and what is wrong.
pub fn read_config<T: ComponentConfig>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {} {}", T::WHAT, path.display()))?;
    let cfg: T = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{} {} is not a valid config: {e}", T::WHAT, path.display()))?;
    cfg.validate()
        .with_context(|| format!("invalid {} {}", T::WHAT, path.display()))?;
    Ok(cfg)
}

fn looks_like_path(s: &str) -> bool {
    s.starts_with('.')
        || s.starts_with('/')
        || s.starts_with('~')
        || s.matches('/').count() != 1
        || s.contains('\\')
}

fn hub_error(id: &str, rel: &str, err: anyhow::Error) -> anyhow::Error {
    let msg = format!("{err:#}");
    let line = format!(
        "cannot fetch {rel} of {id} from the Hugging Face hub ({msg}); {}",
        hub_hint(id, &msg)
    );
    // A missing file keeps its cause: `has_file` tells "not there" from trouble by it.
    if err.chain().any(|c| c.is::<hub::NotFound>()) {
        err.context(line)
    } else {
        anyhow!(line)
    }
}

/// What to do about a failed hub request, from its message.
fn hub_hint(id: &str, msg: &str) -> String {
    if msg.contains("incomplete") || msg.contains("corrupt") {
        "nothing was kept in the cache; run again (or check HF_ENDPOINT)".into()
    } else if msg.contains("invalid") {
        "HF_ENDPOINT may not be a Hugging Face hub".into()
    } else if msg.contains("401") || msg.contains("403") {
        // The 9B and 9B-KV repos are gated (spec-wave2 §6).
        format!(
            "the repo is gated or private: accept its licence on the model page \
             https://huggingface.co/{id} while logged in, then set HF_TOKEN to a token of that \
             account (or run `huggingface-cli login`)"
        )
    } else if msg.contains("404") {
        "check the repo id and --revision".into()
    } else {
        "no network? download the model once, or pass a local diffusers-layout directory with \
         --model DIR (or FLUX2_KLEIN_MODEL=DIR)"
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_heuristics() {
        assert!(!looks_like_path("black-forest-labs/FLUX.2-klein-4B"));
        assert!(looks_like_path("./models/x"));
        assert!(looks_like_path("/abs/dir"));
        assert!(looks_like_path("a/b/c"));
        assert!(looks_like_path("plainname"));
    }

    #[test]
    fn missing_local_dir_is_a_clear_error() {
        let err = ModelDir::resolve("/nonexistent/klein", None).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn gated_repos_say_how_to_get_access() {
        let id = "black-forest-labs/FLUX.2-klein-9b-kv";
        for status in ["401 Unauthorized", "403 Forbidden"] {
            let hint = hub_hint(id, &format!("request error: status code {status}"));
            assert!(hint.contains("accept its licence"), "{hint}");
            assert!(
                hint.contains(&format!("https://huggingface.co/{id}")),
                "{hint}"
            );
            assert!(hint.contains("HF_TOKEN"), "{hint}");
        }
        assert!(hub_hint(id, "status code 404").contains("repo id"));
    }

    #[test]
    fn pipeline_class_names() {
        let kind = |c: Option<&str>| PipelineKind::from_class_name(c);
        assert_eq!(
            kind(Some("Flux2KleinPipeline")).unwrap(),
            PipelineKind::Klein
        );
        assert_eq!(
            kind(Some("Flux2KleinInpaintPipeline")).unwrap(),
            PipelineKind::Klein
        );
        assert_eq!(
            kind(Some("Flux2KleinKVPipeline")).unwrap(),
            PipelineKind::KleinKv
        );
        for bad in [Some("Flux2Pipeline"), Some("StableDiffusionPipeline"), None] {
            let err = kind(bad).unwrap_err().to_string();
            for name in PipelineKind::SUPPORTED {
                assert!(err.contains(name), "{err}");
            }
        }
    }
}
