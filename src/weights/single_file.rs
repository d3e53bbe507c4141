//! One single-file transformer checkpoint (`generate --transformer FILE`) served to the model
//! under diffusers names: BFL names (`double_blocks.N…`, the layout of
//! `flux-2-klein-4b.safetensors` and the fp8 files, spec-wave2 §2.2) or diffusers names, with
//! or without a `model.diffusion_model.` / `diffusion_model.` / `transformer.` prefix; dense
//! (bf16/f16/f32) or fp8 weights with their scales.
//!
//! fp8 weights are dequantised when they are read, `w = f32(q) · weight_scale`, then cast to
//! the compute dtype (the reference behaviour on the CPU and on GPUs without fp8 tensor cores;
//! `input_scale` is not used there). The conventions read (spec-wave2 §2.2, §2.3):
//! * BFL: `F8_E4M3` `<stem>.weight` + F32 scalar `<stem>.weight_scale` / `<stem>.input_scale`,
//!   the quantised stems listed in the header's `__metadata__["_quantization_metadata"]`;
//! * ComfyUI: per-layer `<stem>.comfy_quant` (U8 bytes of `{"format": …}`), and legacy
//!   "scaled fp8" (`scaled_fp8` marker, `<stem>.scale_weight` / `<stem>.scale_input`);
//! * `F8_E5M2` weights; per-output-row scales (`[out]` or `[out, 1]`) as well as scalars;
//! * plain fp8 casts without any scale (read with scale 1, as ComfyUI does).
//!
//! Refused with one line each: a scale whose weight is missing (orphan), a format other than
//! fp8 (NVFP4's `weight_scale_2`, a declared `nvfp4`, packed U8 weights), a declared fp8
//! layer without its `weight_scale`. A scale beside a weight that is not fp8 is ignored with
//! a warning (one report says BFL's 9B file has such scales).
//!
//! [`TransformerFile::check`] walks the model's whole load against the file's header alone
//! (names, shapes, dtypes; nothing is read or allocated at full size), so a file that does not
//! fit `--model`'s `transformer/config.json` fails before anything loads, naming the first
//! mismatching tensor.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use safetensors::Dtype as StDtype;

use super::fp8::Fp8Format;

/// A `candle_core::Error` of one message (no backtrace: it becomes one line for the user).
macro_rules! msg {
    ($($arg:tt)*) => {
        candle_core::Error::Msg(format!($($arg)*))
    };
}
pub(super) use msg;

/// The largest safetensors header read (the safetensors crate's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Key prefixes a single file may put before the model's names (ComfyUI, some trainers).
const PREFIXES: &[&str] = &[
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "",
];

/// How the file names the model's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// Black Forest Labs' names (`double_blocks.0.img_attn.qkv.weight`, …).
    Bfl,
    /// diffusers' names (`transformer_blocks.0.attn.to_q.weight`, …).
    Diffusers,
}

/// The scale of one fp8 weight.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightScale {
    /// One scale for the whole tensor (BFL's and ComfyUI's files).
    Tensor(f32),
    /// One scale per output row.
    Rows(Vec<f32>),
}

/// An fp8 weight of the file: its format and scale.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Weight {
    pub format: Fp8Format,
    pub scale: WeightScale,
}

pub(super) struct Inner {
    pub(super) path: PathBuf,
    pub(super) tensors: MmapedSafetensors,
    pub(super) prefix: String,
    pub(super) naming: Naming,
    /// fp8 tensors by their name in the file (prefix included).
    pub(super) fp8: HashMap<String, Fp8Weight>,
    warnings: Vec<String>,
    /// File names the model asked for (for the unused-tensor warning of `check`).
    pub(super) used: Mutex<BTreeSet<String>>,
}

/// An opened single-file transformer checkpoint; cheap to clone. Reading it:
/// [`super::file_backend`].
#[derive(Clone)]
pub struct TransformerFile(pub(super) Arc<Inner>);

impl std::fmt::Debug for TransformerFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransformerFile")
            .field("path", &self.0.path)
            .field("naming", &self.0.naming)
            .field("fp8_weights", &self.0.fp8.len())
            .finish()
    }
}

/// `__metadata__` of a safetensors file, read from its header alone (bounded).
pub fn header_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| anyhow!("{} is not a safetensors file (too short)", path.display()))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES || n.saturating_add(8) > len {
        bail!(
            "{} is not a safetensors file (its header claims {n} bytes)",
            path.display()
        );
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: BTreeMap<String, String>,
    }
    let h: Header = serde_json::from_slice(&header)
        .map_err(|e| anyhow!("{} has an invalid safetensors header: {e}", path.display()))?;
    Ok(h.metadata)
}

fn is_fp8(dtype: StDtype) -> Option<Fp8Format> {
    match dtype {
        StDtype::F8_E4M3 => Some(Fp8Format::E4M3),
        StDtype::F8_E5M2 => Some(Fp8Format::E5M2),
        _ => None,
    }
}

/// The stem of a scale tensor's name and whether it is a weight scale (`weight_scale`,
/// ComfyUI's legacy `scale_weight`) or an input scale (`input_scale`, `scale_input`).
pub(super) fn scale_stem(name: &str) -> Option<(&str, bool)> {
    for (suffix, is_weight) in [
        (".weight_scale", true),
        (".scale_weight", true),
        (".input_scale", false),
        (".scale_input", false),
    ] {
        if let Some(stem) = name.strip_suffix(suffix) {
            return Some((stem, is_weight));
        }
    }
    None
}

/// The quantisation format names of a `{"format": …}` record.
fn record_format(v: &serde_json::Value) -> Option<String> {
    v.get("format").and_then(|f| f.as_str()).map(str::to_string)
}

impl TransformerFile {
    /// Memory-maps `path`, finds its naming and reads its quantisation (see the module doc).
    pub fn open(path: &Path) -> Result<Self> {
        let shown = path.display();
        if !path.is_file() {
            bail!("transformer file {shown} does not exist or is not a file");
        }
        let metadata = header_metadata(path)?;
        // SAFETY: the file is memory-mapped read-only and not modified while loading.
        let tensors = unsafe { MmapedSafetensors::new(path) }
            .map_err(|e| anyhow!("{shown} is not a valid safetensors file: {e}"))?;
        let infos: BTreeMap<String, (StDtype, Vec<usize>)> = tensors
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec())))
            .collect();
        let (prefix, naming) =
            detect_naming(infos.keys().map(String::as_str)).ok_or_else(|| {
                anyhow!(
                    "{shown} is not a FLUX.2 transformer checkpoint: it has no `double_blocks.*` \
                 (BFL names) or `transformer_blocks.*` (diffusers names) tensors"
                )
            })?;
        let mut warnings = Vec::new();

        // Declared formats: the BFL header, then ComfyUI's per-layer records.
        let mut declared: BTreeMap<String, String> = BTreeMap::new();
        if let Some(text) = metadata.get("_quantization_metadata") {
            let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                anyhow!("{shown}: the `_quantization_metadata` header is not valid JSON: {e}")
            })?;
            let layers = v.get("layers").and_then(|l| l.as_object()).ok_or_else(|| {
                anyhow!("{shown}: the `_quantization_metadata` header has no `layers` object")
            })?;
            for (stem, rec) in layers {
                let format = record_format(rec).ok_or_else(|| {
                    anyhow!("{shown}: `_quantization_metadata` gives layer `{stem}` no `format`")
                })?;
                let stem = if stem.starts_with(&prefix) {
                    stem.clone()
                } else {
                    format!("{prefix}{stem}")
                };
                declared.insert(stem, format);
            }
        }
        for (name, (dtype, _)) in &infos {
            let Some(stem) = name.strip_suffix(".comfy_quant") else {
                continue;
            };
            let view = tensors.get(name)?;
            let rec: serde_json::Value = (*dtype == StDtype::U8)
                .then(|| serde_json::from_slice(view.data()).ok())
                .flatten()
                .ok_or_else(|| {
                    anyhow!("{shown}: `{name}` is not a U8 tensor holding a JSON record")
                })?;
            let format =
                record_format(&rec).ok_or_else(|| anyhow!("{shown}: `{name}` has no `format`"))?;
            declared.insert(stem.to_string(), format);
        }
        if let Some(name) = infos.keys().find(|k| k.ends_with(".weight_scale_2")) {
            bail!(
                "{shown} is NVFP4-quantised (`{name}`), which flux2-klein cannot run; use the \
                 bf16 or the fp8 file"
            );
        }
        for (stem, format) in &declared {
            if Fp8Format::from_name(format).is_none() {
                bail!(
                    "{shown}: layer `{stem}` uses the quantisation format `{format}`, which \
                     flux2-klein cannot run (only float8_e4m3fn and float8_e5m2); use the bf16 \
                     or the fp8 file"
                );
            }
            if !infos.contains_key(&format!("{stem}.weight")) {
                bail!("{shown}: quantised layer `{stem}` has no `{stem}.weight`");
            }
        }

        // Scales: each must belong to a weight; those of fp8 weights give the weight's scale.
        let mut scales: HashMap<String, WeightScale> = HashMap::new();
        for (name, (dtype, shape)) in &infos {
            let Some((stem, is_weight_scale)) = scale_stem(name) else {
                continue;
            };
            let weight = format!("{stem}.weight");
            let Some((wdtype, wshape)) = infos.get(&weight) else {
                bail!("{shown}: `{name}` is a scale without a weight (no `{weight}` in the file)");
            };
            if is_fp8(*wdtype).is_none() {
                warnings.push(format!(
                    "{shown}: ignoring `{name}`: its weight `{weight}` is stored as {wdtype:?}, \
                     not fp8"
                ));
                continue;
            }
            if !is_weight_scale {
                continue; // input scales: for fp8 matmuls only
            }
            // The shape first: nothing is read for a scale of a size the weight cannot have.
            let rows = wshape.first().copied().unwrap_or(1);
            let per_row = match shape.as_slice() {
                [] | [1] => false,
                [r] | [r, 1] if *r == rows => true,
                _ => bail!(
                    "{shown}: `{name}` has shape {shape:?}; a weight scale is a scalar or one \
                     value per row of `{weight}` {wshape:?}"
                ),
            };
            let values: Vec<f32> = tensors
                .load(name, &Device::Cpu)
                .map_err(|e| anyhow!("{shown}: cannot read the scale `{name}` ({dtype:?}): {e}"))?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let scale = if per_row {
                WeightScale::Rows(values.clone())
            } else {
                WeightScale::Tensor(values[0])
            };
            if let Some(bad) = values.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                bail!("{shown}: `{name}` holds {bad}; weight scales are positive and finite");
            }
            scales.insert(weight, scale);
        }

        let mut fp8 = HashMap::new();
        let mut unscaled = 0usize;
        for (name, (dtype, _)) in &infos {
            let Some(format) = is_fp8(*dtype) else {
                continue;
            };
            if name.ends_with("scaled_fp8") {
                continue; // ComfyUI's marker, an empty fp8 tensor
            }
            let stem = name.strip_suffix(".weight").unwrap_or(name);
            if let Some(decl) = declared.get(stem).and_then(|f| Fp8Format::from_name(f)) {
                if decl != format {
                    bail!(
                        "{shown}: `{name}` is stored as {dtype:?} but its layer is declared {}",
                        decl.name()
                    );
                }
            }
            let scale = match scales.remove(name) {
                Some(s) => s,
                None if declared.contains_key(stem) => bail!(
                    "{shown}: the fp8 weight `{name}` has no `{stem}.weight_scale`; the file is \
                     incomplete"
                ),
                None => {
                    unscaled += 1;
                    WeightScale::Tensor(1.0)
                }
            };
            fp8.insert(name.clone(), Fp8Weight { format, scale });
        }
        if unscaled > 0 {
            warnings.push(format!(
                "{shown}: {unscaled} fp8 tensors have no scale; read as plain casts (scale 1), \
                 as ComfyUI does"
            ));
        }
        Ok(Self(Arc::new(Inner {
            path: path.to_path_buf(),
            tensors,
            prefix,
            naming,
            fp8,
            warnings,
            used: Mutex::new(BTreeSet::new()),
        })))
    }

    pub fn path(&self) -> &Path {
        &self.0.path
    }

    pub fn naming(&self) -> Naming {
        self.0.naming
    }

    /// The key prefix found (`""` if none).
    pub fn prefix(&self) -> &str {
        &self.0.prefix
    }

    /// The fp8 tensors, by their name in the file.
    pub fn fp8_weights(&self) -> &HashMap<String, Fp8Weight> {
        &self.0.fp8
    }

    /// What the user should know about the file (ignored scales, unscaled fp8 tensors).
    pub fn warnings(&self) -> &[String] {
        &self.0.warnings
    }

    /// Whether the model tensor `name` (a diffusers name) is stored as fp8 in the file.
    pub fn is_fp8(&self, name: &str) -> bool {
        self.source(name)
            .is_some_and(|s| self.0.fp8.contains_key(&self.full(&s)))
    }
}

/// The key prefix and naming of a file's tensor names.
fn detect_naming<'a>(names: impl Iterator<Item = &'a str> + Clone) -> Option<(String, Naming)> {
    const BFL: &[&str] = &["double_blocks.", "single_blocks.", "img_in."];
    const DIFFUSERS: &[&str] = &[
        "transformer_blocks.",
        "single_transformer_blocks.",
        "x_embedder.",
    ];
    for prefix in PREFIXES {
        for (roots, naming) in [(BFL, Naming::Bfl), (DIFFUSERS, Naming::Diffusers)] {
            let hit = names.clone().any(|n| {
                n.strip_prefix(prefix)
                    .is_some_and(|rest| roots.iter().any(|r| rest.starts_with(r)))
            });
            if hit {
                return Some((prefix.to_string(), naming));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naming_and_prefix() {
        let n = |names: &[&str]| detect_naming(names.iter().copied());
        assert_eq!(
            n(&["img_in.weight", "double_blocks.0.img_attn.qkv.weight"]),
            Some((String::new(), Naming::Bfl))
        );
        assert_eq!(
            n(&["model.diffusion_model.double_blocks.0.img_mlp.0.weight"]),
            Some(("model.diffusion_model.".into(), Naming::Bfl))
        );
        assert_eq!(
            n(&["transformer.x_embedder.weight"]),
            Some(("transformer.".into(), Naming::Diffusers))
        );
        assert_eq!(
            n(&["single_transformer_blocks.0.attn.to_out.weight"]),
            Some((String::new(), Naming::Diffusers))
        );
        assert_eq!(n(&["model.layers.0.mlp.up_proj.weight"]), None);
    }

    /// Per-row scales multiply their rows; a scale beside a bf16 weight is ignored with a
    /// warning; unscaled fp8 tensors are plain casts.
    #[test]
    fn per_row_scales_and_ignored_scales() {
        use safetensors::tensor::TensorView;
        let dir = std::env::temp_dir().join(format!("flux2-klein-fp8-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rows.safetensors");
        let codes = [0x38u8, 0x40, 0x38, 0xC0]; // 1, 2, 1, -2
        let rows = [2.0f32, 0.5].map(f32::to_le_bytes).concat();
        let one = 1.0f32.to_le_bytes();
        let bf16 = [half::bf16::from_f32(1.0); 4]
            .map(|v| v.to_bits().to_le_bytes())
            .concat();
        let tensors = [
            (
                "x_embedder.weight",
                TensorView::new(StDtype::F8_E4M3, vec![2, 2], &codes).unwrap(),
            ),
            (
                "x_embedder.weight_scale",
                TensorView::new(StDtype::F32, vec![2], &rows).unwrap(),
            ),
            (
                "context_embedder.weight",
                TensorView::new(StDtype::BF16, vec![2, 2], &bf16).unwrap(),
            ),
            (
                "context_embedder.weight_scale",
                TensorView::new(StDtype::F32, vec![], &one).unwrap(),
            ),
            (
                "proj_out.weight",
                TensorView::new(StDtype::F8_E4M3, vec![2, 2], &codes).unwrap(),
            ),
        ];
        safetensors::serialize_to_file(tensors, None, &path).unwrap();
        let file = TransformerFile::open(&path).unwrap();
        assert_eq!(file.naming(), Naming::Diffusers);
        let w = file.warnings().join("\n");
        assert!(
            w.contains("ignoring `context_embedder.weight_scale`"),
            "{w}"
        );
        assert!(w.contains("1 fp8 tensors have no scale"), "{w}");
        let vb = file.var_builder(DType::F32, &Device::Cpu);
        let get = |n: &str| {
            vb.get((2, 2), n)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(get("x_embedder.weight"), [2.0, 4.0, 0.5, -1.0]);
        assert_eq!(get("context_embedder.weight"), [1.0; 4]);
        assert_eq!(get("proj_out.weight"), [1.0, 2.0, 1.0, -2.0]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn scale_names() {
        assert_eq!(scale_stem("a.b.weight_scale"), Some(("a.b", true)));
        assert_eq!(scale_stem("a.b.scale_weight"), Some(("a.b", true)));
        assert_eq!(scale_stem("a.b.input_scale"), Some(("a.b", false)));
        assert_eq!(scale_stem("a.b.weight"), None);
    }
}
