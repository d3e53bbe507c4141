//! Merging adapters into the transformer's weights as they load: a `VarBuilder` backend over
//! the checkpoint's backend that, when the model asks for a weight some adapter targets,
//! loads it in f32 on the device, adds `Σ s·ΔW` (computed there in f32), and casts it to
//! the model's dtype. One weight at a time, so the extra memory is a few f32 copies of that
//! one weight (the weight, its delta, their sum), never of the model; the files on disk are
//! only read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::formats::{Delta, Factor};
use super::AppliedLora;

/// One adapter's share of one weight: its delta (a row block of it for fused LoKr
/// projections) times `scale` (the user's scale × the file's alpha/rank).
struct Part {
    delta: Arc<Delta>,
    /// Row block `i` of 3 (q, k, v of a fused projection).
    rows: Option<usize>,
    scale: f64,
}

/// The backend: `inner` serves the checkpoint, the parts are added by weight name.
pub struct MergingBackend {
    inner: Box<dyn SimpleBackend>,
    parts: BTreeMap<String, Vec<Part>>,
    /// Weight names not asked for yet; all must be by the end of the load.
    pending: Arc<Mutex<BTreeSet<String>>>,
}

impl MergingBackend {
    /// The backend and the set of targeted weights not loaded yet (empty after a complete
    /// load; see [`super::check_all_merged`]).
    pub fn new(
        inner: Box<dyn SimpleBackend>,
        adapters: &[AppliedLora],
    ) -> (Self, Arc<Mutex<BTreeSet<String>>>) {
        let mut parts: BTreeMap<String, Vec<Part>> = BTreeMap::new();
        for applied in adapters {
            for (module, delta) in &applied.lora.modules {
                let scale = applied.scale * applied.lora.module_scale(module);
                match super::read::fused_parts(module) {
                    Some(split) => {
                        for (i, m) in split.into_iter().enumerate() {
                            parts.entry(format!("{m}.weight")).or_default().push(Part {
                                delta: delta.clone(),
                                rows: Some(i),
                                scale,
                            });
                        }
                    }
                    None => parts
                        .entry(format!("{module}.weight"))
                        .or_default()
                        .push(Part {
                            delta: delta.clone(),
                            rows: None,
                            scale,
                        }),
                }
            }
        }
        let pending = Arc::new(Mutex::new(parts.keys().cloned().collect()));
        (
            Self {
                inner,
                parts,
                pending: pending.clone(),
            },
            pending,
        )
    }

    fn merged(
        &self,
        s: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let Some(parts) = self.parts.get(name) else {
            return self.inner.get(s, name, init, dtype, dev);
        };
        if let Ok(mut p) = self.pending.lock() {
            p.remove(name);
        }
        let mut w = self.inner.get(s, name, init, DType::F32, dev)?;
        for part in parts {
            let delta = delta_weight(&part.delta, part.scale, dev)?;
            let delta = match part.rows {
                Some(i) => {
                    let rows = delta.dim(0)? / 3;
                    delta.narrow(0, i * rows, rows)?
                }
                None => delta,
            };
            if delta.shape() != w.shape() {
                candle_core::bail!(
                    "LoRA delta for {name} has shape {:?} but the weight is {:?}",
                    delta.dims(),
                    w.dims()
                );
            }
            w = (w + delta)?;
        }
        w.to_dtype(dtype)
    }
}

/// `scale · ΔW` in f32 on `dev`: `(scale·B)·A`, or `kron(scale·w1, w2)` (torch's
/// `torch.kron` on matrices). The scale goes on the small factor: one pass fewer over the
/// layer-sized delta.
pub fn delta_weight(delta: &Delta, scale: f64, dev: &Device) -> Result<Tensor> {
    let f32_on = |t: &Tensor| t.to_device(dev)?.to_dtype(DType::F32);
    match delta {
        Delta::LowRank { down, up } => (f32_on(up)? * scale)?.matmul(&f32_on(down)?),
        Delta::Kronecker { w1, w2 } => {
            let factor = |f: &Factor| match f {
                Factor::Full(t) => f32_on(t),
                Factor::Product(a, b) => f32_on(a)?.matmul(&f32_on(b)?),
            };
            let (w1, w2) = ((factor(w1)? * scale)?, factor(w2)?);
            let (a, b) = w1.dims2()?;
            let (c, d) = w2.dims2()?;
            // kron[i·c + k, j·d + l] = w1[i, j] · w2[k, l]
            w1.reshape((a, 1, b, 1))?
                .broadcast_mul(&w2.reshape((1, c, 1, d))?)?
                .reshape((a * c, b * d))
        }
    }
}

impl SimpleBackend for MergingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.merged(s, name, init, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        if self.parts.contains_key(name) {
            let shape = self
                .inner
                .get_unchecked(name, DType::F32, &Device::Cpu)?
                .shape()
                .clone();
            return self.merged(shape, name, candle_nn::Init::Const(0.), dtype, dev);
        }
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kron_matches_the_definition() {
        let dev = Device::Cpu;
        let w1 = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let w2 = Tensor::new(&[[0f32, 5., 1.]], &dev).unwrap();
        let k = delta_weight(
            &Delta::Kronecker {
                w1: Factor::Full(w1),
                w2: Factor::Full(w2),
            },
            1.0,
            &dev,
        )
        .unwrap();
        assert_eq!(
            k.to_vec2::<f32>().unwrap(),
            [[0., 5., 1., 0., 10., 2.], [0., 15., 3., 0., 20., 4.]]
        );
    }
}
