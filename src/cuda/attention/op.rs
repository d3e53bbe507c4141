//! The kernel as a candle custom op: the layout checks of its three operands, its launch
//! arguments (see the `FA_PARAMS` list of flash_attn.cu) and its grid, plus the preparation of
//! the inputs and the per-row causal launches.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{bail, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::select::{KernelConfig, MAX_HEAD_DIM};
use super::AttnLayout;
use crate::cuda::launch::{cuda_only_cpu_fwd, launch, uninit, view, wrap, KernelArg};

/// Attention without a mask on inputs [`super::is_supported`] accepts, output contiguous in
/// `layout`; the kernel is [`KernelConfig::select`]'s, or `config` when given (the Hopper
/// self-check).
pub(super) fn run(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    layout: AttnLayout,
    config: Option<KernelConfig>,
) -> Result<Tensor> {
    let (q, k, v) = (kernel_ready(q)?, kernel_ready(k)?, kernel_ready(v)?);
    let op = FlashAttn {
        scale,
        layout,
        config,
        causal: None,
    };
    q.apply_op3_no_bwd(&k, &v, &op)
}

/// Causal attention with right padding on inputs [`super::is_supported`] accepts: one launch
/// per batch row, as the rows' padding differs (prompt and negative prompt).
pub(super) fn run_causal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    layout: AttnLayout,
    kv_valid: &[usize],
) -> Result<Tensor> {
    let b = q.dim(0)?;
    if kv_valid.len() != b {
        bail!(
            "causal flash attention: {} kv_valid lengths for a batch of {b}",
            kv_valid.len()
        )
    }
    let heads_dim = match layout {
        AttnLayout::Bhsd => 1,
        AttnLayout::Bshd => 2,
    };
    let kv_group = q.dim(heads_dim)? / k.dim(heads_dim)?;
    let rows = (0..b)
        .map(|i| {
            let row = |t: &Tensor| kernel_ready(&t.narrow(0, i, 1)?);
            let op = FlashAttn {
                scale,
                layout,
                config: None,
                causal: Some(CausalMask {
                    kv_valid: kv_valid[i],
                    kv_group,
                }),
            };
            row(q)?.apply_op3_no_bwd(&row(k)?, &row(v)?, &op)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0) // one row: returned as is
}

/// Makes `t` acceptable to the kernel: contiguous head dim, 8-aligned strides and offset.
fn kernel_ready(t: &Tensor) -> Result<Tensor> {
    let l = t.layout();
    let s = l.stride();
    let ok = s.len() == 4
        && s[3] == 1
        && s[..3].iter().all(|x| x.is_multiple_of(8))
        && l.start_offset().is_multiple_of(8);
    if ok {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// The custom op: `q`, `k`, `v` in `layout`, output contiguous in the same layout; the kernel
/// is [`KernelConfig::select`]'s, or `config` when given, or the causal instance with `causal`.
struct FlashAttn {
    scale: f32,
    layout: AttnLayout,
    config: Option<KernelConfig>,
    causal: Option<CausalMask>,
}

/// The causal kernel's mask: query `i` sees key `j` iff `j <= i` and `j < kv_valid`; K/V have
/// `heads / kv_group` heads (grouped-query attention).
#[derive(Clone, Copy, Debug)]
struct CausalMask {
    kv_valid: usize,
    kv_group: usize,
}

/// (batch, heads, seq, head_dim) and the element strides (batch, heads, seq) of one tensor.
fn dims_and_strides(what: &str, l: &Layout, layout: AttnLayout) -> Result<([usize; 4], [i64; 3])> {
    let dims = l.dims();
    let stride = l.stride();
    if dims.len() != 4 {
        bail!(
            "flash attention: {what} must have rank 4, got shape {:?}",
            l.shape()
        )
    }
    let (b, s, h, d) = match layout {
        AttnLayout::Bhsd => (0, 2, 1, 3),
        AttnLayout::Bshd => (0, 1, 2, 3),
    };
    if stride[d] != 1
        || [stride[b], stride[h], stride[s]]
            .iter()
            .any(|&x| x % 8 != 0)
    {
        bail!(
            "flash attention: {what} needs a contiguous last dim and other strides that are \
             multiples of 8, got strides {stride:?} (call .contiguous())"
        )
    }
    if !l.start_offset().is_multiple_of(8) {
        bail!(
            "flash attention: {what} starts at element offset {} (must be a multiple of 8; \
             call .contiguous())",
            l.start_offset()
        )
    }
    Ok((
        [dims[b], dims[h], dims[s], dims[d]],
        [stride[b] as i64, stride[h] as i64, stride[s] as i64],
    ))
}

/// The scalar kernel arguments (see the `FA_PARAMS` list in flash_attn.cu).
struct KernelArgs {
    sq: i32,
    sk: i32,
    d: i32,
    /// (batch, head, seq) element strides of q, k, v, out.
    strides: [[i64; 3]; 4],
    scale_log2: f32,
    n_out: usize,
    /// The causal kernel's two extra arguments (kv_valid, kv_group).
    causal: Option<[i32; 2]>,
}

impl KernelArgs {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        func: &CudaFunction,
        cfg: LaunchConfig,
        dev: &CudaDevice,
        [(qs, ql), (ks, kl), (vs, vl)]: [(&CudaStorage, &Layout); 3],
    ) -> Result<CudaStorage> {
        let (q, k, v) = (view::<T>(qs, ql)?, view::<T>(ks, kl)?, view::<T>(vs, vl)?);
        // SAFETY: the kernel stores every output element (each row < Sq, column < D).
        let out = unsafe { uninit::<T>(dev, self.n_out)? };
        let mut args: Vec<&dyn KernelArg> = vec![&q, &k, &v, &out, &self.sq, &self.sk, &self.d];
        args.extend(self.strides.iter().flatten().map(|s| s as &dyn KernelArg));
        args.push(&self.scale_log2);
        if let Some(extra) = &self.causal {
            args.extend(extra.iter().map(|x| x as &dyn KernelArg));
        }
        // SAFETY: the argument list matches the kernel signature in flash_attn.cu, and the
        // launch configuration matches the kernel's compile-time tiling (`KernelConfig`).
        unsafe { launch(dev, func, cfg, &args) }?;
        Ok(wrap(out, dev))
    }
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "flux2-flash-attention"
    }

    cuda_only_cpu_fwd!(
        3,
        self,
        "the fused flash-attention op runs on CUDA only (flash_attention() falls back to the \
         naive path on CPU)"
    );

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let ([b, h, sq, d], q_st) = dims_and_strides("q", ql, self.layout)?;
        let ([kb, kh, sk, kd], k_st) = dims_and_strides("k", kl, self.layout)?;
        let ([vb, vh, sv, vd], v_st) = dims_and_strides("v", vl, self.layout)?;
        let kv_group = self.causal.map_or(1, |c| c.kv_group);
        if kv_group == 0
            || (kb, kh * kv_group, kd) != (b, h, d)
            || (vb, vh, sv, vd) != (kb, kh, sk, kd)
        {
            bail!(
                "flash attention: shape mismatch q {:?}, k {:?}, v {:?} ({:?} layout)",
                ql.shape(),
                kl.shape(),
                vl.shape(),
                self.layout
            )
        }
        if !(self.scale > 0.0 && self.scale.is_finite()) {
            bail!(
                "flash attention: the kernel needs a finite scale > 0, got {}",
                self.scale
            )
        }
        if sk == 0 || d % 8 != 0 || d > MAX_HEAD_DIM {
            bail!("flash attention: needs Sk > 0 and a head dim that is a multiple of 8 up to {MAX_HEAD_DIM}, got Sk={sk}, D={d}")
        }
        if let Some(c) = self.causal {
            if sq != sk || c.kv_valid == 0 || c.kv_valid > sk {
                bail!(
                    "causal flash attention: needs Sq = Sk and 1 <= kv_valid <= Sk, got Sq={sq}, \
                     Sk={sk}, kv_valid={}",
                    c.kv_valid
                )
            }
        }
        let dtype = qs.dtype();
        let cfg = match self.causal {
            Some(_) => KernelConfig::causal_for_head_dim(d),
            None => self
                .config
                .or_else(|| KernelConfig::select(qs.device(), d, dtype)),
        }
        .ok_or_else(|| candle_core::Error::Msg(format!("flash attention: head dim {d}")))?;
        if ks.dtype() != dtype || vs.dtype() != dtype {
            bail!(
                "flash attention: q/k/v dtypes differ ({dtype:?}, {:?}, {:?})",
                ks.dtype(),
                vs.dtype()
            )
        }
        let dev = qs.device();
        let out_shape: Shape = match self.layout {
            AttnLayout::Bhsd => (b, h, sq, d).into(),
            AttnLayout::Bshd => (b, sq, h, d).into(),
        };
        let o_st: [i64; 3] = match self.layout {
            AttnLayout::Bhsd => [(h * sq * d) as i64, (sq * d) as i64, d as i64],
            AttnLayout::Bshd => [(sq * h * d) as i64, d as i64, (h * d) as i64],
        };
        let func = cfg.load(dev, dtype)?;
        let launch = LaunchConfig {
            grid_dim: (sq.div_ceil(cfg.block_m()) as u32, h as u32, b as u32),
            block_dim: (cfg.threads(), 1, 1),
            shared_mem_bytes: cfg.shared_mem_bytes() as u32,
        };
        if h > 65535 || b > 65535 || sq > i32::MAX as usize || sk > i32::MAX as usize {
            bail!("flash attention: too many heads/batches/positions (B={b}, H={h}, Sq={sq}, Sk={sk})")
        }
        let launch_args = KernelArgs {
            sq: sq as i32,
            sk: sk as i32,
            d: d as i32,
            strides: [q_st, k_st, v_st, o_st],
            scale_log2: self.scale * std::f32::consts::LOG2_E,
            n_out: out_shape.elem_count(),
            causal: self.causal.map(|c| [c.kv_valid as i32, c.kv_group as i32]),
        };
        let inputs = [(qs, ql), (ks, kl), (vs, vl)];
        let storage = match dtype {
            DType::BF16 => launch_args.run::<half::bf16>(&func, launch, dev, inputs)?,
            DType::F16 => launch_args.run::<half::f16>(&func, launch, dev, inputs)?,
            dt => {
                bail!("flash attention: dtype {dt:?} not supported by the kernel (bf16/f16 only)")
            }
        };
        Ok((storage, out_shape))
    }
}
