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
use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use safetensors::Dtype as StDtype;

use super::fp8::{self, Fp8Format};
use crate::transformer::bfl::{bfl_source, BflSource};
use crate::transformer::{Flux2Transformer, Flux2TransformerConfig};

/// A `candle_core::Error` of one message (no backtrace: it becomes one line for the user).
macro_rules! msg {
    ($($arg:tt)*) => {
        candle_core::Error::Msg(format!($($arg)*))
    };
}
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

struct Inner {
    path: PathBuf,
    tensors: MmapedSafetensors,
    prefix: String,
    naming: Naming,
    /// fp8 tensors by their name in the file (prefix included).
    fp8: HashMap<String, Fp8Weight>,
    warnings: Vec<String>,
    /// File names the model asked for (for the unused-tensor warning of `check`).
    used: Mutex<BTreeSet<String>>,
}

/// An opened single-file transformer checkpoint; cheap to clone.
#[derive(Clone)]
pub struct TransformerFile(Arc<Inner>);

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
fn scale_stem(name: &str) -> Option<(&str, bool)> {
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
            let values: Vec<f32> = tensors
                .load(name, &Device::Cpu)
                .map_err(|e| anyhow!("{shown}: cannot read the scale `{name}` ({dtype:?}): {e}"))?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let rows = wshape.first().copied().unwrap_or(1);
            let scale = match shape.as_slice() {
                [] | [1] => WeightScale::Tensor(values[0]),
                [r] | [r, 1] if *r == rows => WeightScale::Rows(values.clone()),
                _ => bail!(
                    "{shown}: `{name}` has shape {shape:?}; a weight scale is a scalar or one \
                     value per row of `{weight}` {wshape:?}"
                ),
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

    /// Loads the model against the header alone (nothing is read): every tensor the model
    /// needs exists with the shape `cfg` gives it and a dtype that can be read. Returns the
    /// warning for tensors of the file the model does not use, if any.
    pub fn check(&self, cfg: &Flux2TransformerConfig) -> Result<Option<String>> {
        let backend = FileBackend {
            file: self.clone(),
            shapes_only: true,
            keep_fp8: false,
        };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
        Flux2Transformer::load(vb, cfg).with_context(|| {
            format!(
                "the transformer file {} does not fit the model's transformer config",
                self.0.path.display()
            )
        })?;
        let used = self.0.used.lock().expect("not poisoned").clone();
        let unused: Vec<String> = self
            .0
            .tensors
            .tensors()
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| {
                !used.contains(k)
                    && scale_stem(k).is_none()
                    && !k.ends_with(".comfy_quant")
                    && k != "scaled_fp8"
            })
            .collect();
        Ok(unused.first().map(|first| {
            format!(
                "{} tensors of {} are not used by the model (first: `{first}`); is the file \
                 for another variant than --model's config?",
                unused.len(),
                self.0.path.display()
            )
        }))
    }

    /// A `VarBuilder` serving the model's (diffusers) names from the file, in `dtype` on
    /// `device`, every weight dequantised.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.backend(false)), dtype, device.clone())
    }

    /// The file as a `VarBuilder` backend (to wrap, e.g. by [`super::quantize::QuantizeFp8`]).
    /// With `keep_fp8`, E4M3 weights are also offered as stored (`ops::linear::FP8_WEIGHT`),
    /// so the layers keep them in fp8.
    pub fn backend(&self, keep_fp8: bool) -> FileBackend {
        FileBackend {
            file: self.clone(),
            shapes_only: false,
            keep_fp8,
        }
    }

    /// Where the stored E4M3 weight behind the model weight `name` is: its file name and the
    /// rows the model's tensor takes (a fused-qkv chunk), if it can be kept as stored.
    fn resident_source(
        &self,
        name: &str,
        rows_wanted: Option<usize>,
    ) -> Option<(String, usize, usize)> {
        let src = self.source(name)?;
        let full = self.full(&src);
        let w = self.0.fp8.get(&full)?;
        if w.format != Fp8Format::E4M3 {
            return None; // candle has no E5M2 dtype: dequantised at load instead
        }
        let rows = *self.0.tensors.get(&full).ok()?.shape().first()?;
        match src {
            BflSource::Rename(_) => Some((full, 0, rows)),
            BflSource::QkvChunk { index, .. } => {
                let r = rows_wanted.unwrap_or(rows / 3);
                Some((full, index * r, (index + 1) * r))
            }
            BflSource::SwapHalves(_) => None,
        }
    }

    /// The stored E4M3 codes (`FP8_WEIGHT`) or the scale (`FP8_SCALE`) of the model weight
    /// `weight`, on the CPU.
    fn resident(
        &self,
        weight: &str,
        scale: bool,
        s: Option<&Shape>,
    ) -> candle_core::Result<Tensor> {
        let rows_wanted = s.and_then(|s| s.dims().first().copied());
        let (full, r0, r1) = self
            .resident_source(weight, rows_wanted)
            .ok_or_else(|| msg!("`{weight}` is not stored as E4M3 fp8"))?;
        let view = self.0.tensors.get(&full)?;
        let mut shape = view.shape().to_vec();
        shape[0] = r1 - r0;
        if scale {
            return match &self.0.fp8[&full].scale {
                WeightScale::Tensor(v) => Tensor::new(*v, &Device::Cpu),
                WeightScale::Rows(v) => Tensor::from_slice(&v[r0..r1], (r1 - r0, 1), &Device::Cpu),
            };
        }
        if let Some(s) = s {
            if s.dims() != shape.as_slice() {
                return Err(msg!(
                    "`{full}` gives {shape:?} for `{weight}`, but the config needs {:?}",
                    s.dims()
                ));
            }
        }
        let row_len: usize = shape.iter().skip(1).product();
        let codes = &view.data()[r0 * row_len..r1 * row_len];
        Tensor::from_raw_buffer(codes, DType::F8E4M3, &shape, &Device::Cpu)
    }

    /// Where the diffusers tensor `name` is in the file.
    fn source(&self, name: &str) -> Option<BflSource> {
        match self.0.naming {
            Naming::Bfl => bfl_source(name),
            Naming::Diffusers => Some(BflSource::Rename(name.to_string())),
        }
    }

    fn full(&self, src: &BflSource) -> String {
        format!("{}{}", self.0.prefix, src.name())
    }

    /// Rows `[r0, r1)` (all when `None`) of the file tensor `full`, on the CPU: fp8 tensors
    /// dequantised to f32, others in their stored dtype.
    fn read_rows(&self, full: &str, rows: Option<(usize, usize)>) -> candle_core::Result<Tensor> {
        let view = self.0.tensors.get(full)?;
        let shape = view.shape().to_vec();
        let (r0, r1) = rows.unwrap_or((0, shape.first().copied().unwrap_or(1)));
        if let Some(w) = self.0.fp8.get(full) {
            let row_len: usize = shape.iter().skip(1).product();
            let codes = &view.data()[r0 * row_len..r1 * row_len];
            let values = match &w.scale {
                WeightScale::Tensor(s) => fp8::dequantize(codes, *s, w.format),
                WeightScale::Rows(s) => fp8::dequantize_rows(codes, &s[r0..r1], row_len, w.format),
            };
            let mut out_shape = shape;
            if let Some(first) = out_shape.first_mut() {
                *first = r1 - r0;
            }
            return Tensor::from_vec(values, out_shape, &Device::Cpu);
        }
        check_readable(full, view.dtype())?;
        let t = view.load(&Device::Cpu)?;
        match rows {
            Some((r0, r1)) => t.narrow(0, r0, r1 - r0)?.contiguous(),
            None => Ok(t),
        }
    }

    /// The diffusers tensor `name` with shape `s`; with `shapes_only`, a zero-stride
    /// stand-in after the header checks.
    fn get(
        &self,
        s: &Shape,
        name: &str,
        dtype: DType,
        shapes_only: bool,
    ) -> candle_core::Result<Tensor> {
        let src = self.source(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("no BFL checkpoint name is known for `{name}`"))
        })?;
        let full = self.full(&src);
        let view = self.0.tensors.get(&full).map_err(|_| {
            candle_core::Error::Msg(format!(
                "{} has no tensor `{full}` (needed for `{name}`)",
                self.0.path.display()
            ))
        })?;
        let mut want = s.dims().to_vec();
        if let (BflSource::QkvChunk { .. }, Some(first)) = (&src, want.first_mut()) {
            *first *= 3;
        }
        if view.shape() != want.as_slice() {
            return Err(msg!(
                "`{full}` is {:?} in the file, but the config needs {want:?} (for `{name}`)",
                view.shape()
            ));
        }
        if !self.0.fp8.contains_key(&full) {
            check_readable(&full, view.dtype())?;
        }
        self.0
            .used
            .lock()
            .expect("not poisoned")
            .insert(full.clone());
        if shapes_only {
            return Tensor::zeros((), dtype, &Device::Cpu)?.broadcast_as(s.clone());
        }
        let t = match src {
            BflSource::Rename(_) => self.read_rows(&full, None)?,
            BflSource::QkvChunk { index, .. } => {
                let r = s.dims()[0];
                self.read_rows(&full, Some((index * r, (index + 1) * r)))?
            }
            BflSource::SwapHalves(_) => {
                let t = self.read_rows(&full, None)?;
                let rows = t.dim(0)?;
                if rows % 2 != 0 {
                    return Err(msg!("adaLN modulation `{full}` has {rows} rows, not even"));
                }
                let h = rows / 2;
                Tensor::cat(&[t.narrow(0, h, h)?, t.narrow(0, 0, h)?], 0)?
            }
        };
        t.to_dtype(dtype)
    }
}

/// Dense dtypes the model can compute from; anything else is a format we do not run.
fn check_readable(full: &str, dtype: StDtype) -> candle_core::Result<()> {
    match dtype {
        StDtype::BF16 | StDtype::F16 | StDtype::F32 | StDtype::F64 => Ok(()),
        other => Err(msg!(
            "`{full}` is stored as {other:?}, a format flux2-klein cannot read here (packed \
             4-bit or integer weights such as NVFP4); use the bf16 or the fp8 file"
        )),
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

/// [`TransformerFile`] as a `VarBuilder` backend.
pub struct FileBackend {
    file: TransformerFile,
    shapes_only: bool,
    keep_fp8: bool,
}

/// `(model weight name, is the scale)` of an `ops::linear::FP8_WEIGHT` / `FP8_SCALE` name.
pub(crate) fn fp8_request(name: &str) -> Option<(String, bool)> {
    use crate::ops::linear::{FP8_SCALE, FP8_WEIGHT};
    let (module, param) = name.rsplit_once('.')?;
    if param == FP8_WEIGHT {
        Some((format!("{module}.weight"), false))
    } else if param == FP8_SCALE {
        Some((format!("{module}.weight"), true))
    } else {
        None
    }
}

impl FileBackend {
    /// Whether the model tensor `name` comes from an fp8 tensor of the file.
    pub fn is_fp8(&self, name: &str) -> bool {
        self.file.is_fp8(name)
    }
}

impl SimpleBackend for FileBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some((weight, scale)) = fp8_request(name) {
            return self.file.resident(&weight, scale, Some(&s))?.to_device(dev);
        }
        self.file
            .get(&s, name, dtype, self.shapes_only)?
            .to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some((weight, scale)) = fp8_request(name) {
            return self.file.resident(&weight, scale, None)?.to_device(dev);
        }
        let src = self
            .file
            .source(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor for `{name}`")))?;
        let full = self.file.full(&src);
        let dims = self.file.0.tensors.get(&full)?.shape().to_vec();
        let mut s = dims;
        if let (BflSource::QkvChunk { .. }, Some(first)) = (&src, s.first_mut()) {
            *first /= 3;
        }
        self.file
            .get(&Shape::from(s), name, dtype, self.shapes_only)?
            .to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if let Some((weight, _)) = fp8_request(name) {
            return self.keep_fp8 && self.file.resident_source(&weight, None).is_some();
        }
        self.file
            .source(name)
            .is_some_and(|s| self.file.0.tensors.get(&self.file.full(&s)).is_ok())
    }
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

    #[test]
    fn scale_names() {
        assert_eq!(scale_stem("a.b.weight_scale"), Some(("a.b", true)));
        assert_eq!(scale_stem("a.b.scale_weight"), Some(("a.b", true)));
        assert_eq!(scale_stem("a.b.input_scale"), Some(("a.b", false)));
        assert_eq!(scale_stem("a.b.weight"), None);
    }
}
