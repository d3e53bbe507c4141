//! Reading a [`TransformerFile`]: the model's (diffusers) names mapped to the file's, the
//! shapes checked against the config before anything is read, fp8 tensors dequantised (or
//! offered as stored, [`crate::ops::linear::FP8_WEIGHT`]), and the file as a `VarBuilder`
//! backend ([`FileBackend`]).

use anyhow::{Context, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use safetensors::Dtype as StDtype;

use super::fp8::{self, Fp8Format};
use super::single_file::{msg, scale_stem, Naming, TransformerFile, WeightScale};
use crate::transformer::bfl::{bfl_source, BflSource};
use crate::transformer::{Flux2Transformer, Flux2TransformerConfig};

impl TransformerFile {
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
    pub(super) fn source(&self, name: &str) -> Option<BflSource> {
        match self.0.naming {
            Naming::Bfl => bfl_source(name),
            Naming::Diffusers => Some(BflSource::Rename(name.to_string())),
        }
    }

    pub(super) fn full(&self, src: &BflSource) -> String {
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
