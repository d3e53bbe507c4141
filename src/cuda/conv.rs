//! cuDNN 2-D convolution with tensor cores, for the VAE's bf16 convs.
//!
//! candle's cuDNN conv (`Tensor::conv2d` with the `cudnn` feature) never calls
//! `cudnnSetConvolutionMathType`, so its descriptors keep `CUDNN_DEFAULT_MATH`, and cuDNN
//! runs tensor-core kernels for convolutions "only when cudnnSetConvolutionMathType() is
//! called ... with CUDNN_TENSOR_OP_MATH" (cuDNN developer guide, legacy API). That is why the
//! VAE decode was several times slower than diffusers' (measured: BENCHMARKS.md, 2026-11-26).
//! This op is the same NCHW convolution with
//!
//! * `CUDNN_TENSOR_OP_MATH` on the descriptor (bf16/f16 tensor cores, f32 accumulation: the
//!   conv descriptor's compute type is f32, as in PyTorch),
//! * the algorithm chosen once per shape by cuDNN's heuristics (as PyTorch does with
//!   `cudnn.benchmark = False`) and cached,
//! * the workspace taken from the stream-ordered pool without the zero fill candle does.
//!
//! The output is rounded once to the input dtype; the bias is added by the caller, as torch
//! does after its cuDNN call, so the roundings match `nn.Conv2d`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{sys, ConvForward, Cudnn, CudnnDataType};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{bail, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

use super::launch::{cuda_only_cpu_fwd, uninit, view, wrap};

/// Workspaces larger than this are not used (the next heuristic choice is taken instead).
const MAX_WORKSPACE_BYTES: usize = 1 << 30;

/// A convolution problem: everything the algorithm choice depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ConvKey {
    dtype: DType,
    /// (batch, in channels, height, width) of the input.
    input: [usize; 4],
    out_channels: usize,
    kernel: [usize; 2],
    padding: usize,
    stride: usize,
}

impl ConvKey {
    fn out_hw(&self) -> [usize; 2] {
        let out = |i: usize, k: usize| (i + 2 * self.padding - k) / self.stride + 1;
        [
            out(self.input[2], self.kernel[0]),
            out(self.input[3], self.kernel[1]),
        ]
    }
}

/// Per-device cuDNN state, kept per thread like candle's (cuDNN handles are not `Send`).
struct DeviceState {
    cudnn: Arc<Cudnn>,
    /// Chosen algorithm and its workspace size in bytes, per problem.
    algos: HashMap<ConvKey, (sys::cudnnConvolutionFwdAlgo_t, usize)>,
}

thread_local! {
    static STATE: RefCell<HashMap<DeviceId, DeviceState>> = RefCell::new(HashMap::new());
}

/// The custom op: `x [N, Cin, H, W]` (contiguous) ⋆ `w [Cout, Cin, kh, kw]` (contiguous).
struct Conv2dTensorOps {
    padding: usize,
    stride: usize,
}

impl Conv2dTensorOps {
    fn key(&self, xl: &Layout, wl: &Layout, dtype: DType) -> Result<ConvKey> {
        let (xd, wd) = (xl.dims(), wl.dims());
        if xd.len() != 4 || wd.len() != 4 {
            bail!(
                "cudnn conv2d: expects [N, C, H, W] input and [Cout, Cin, kh, kw] weight, got {:?} and {:?}",
                xl.shape(),
                wl.shape()
            )
        }
        if !xl.is_contiguous() || !wl.is_contiguous() {
            bail!("cudnn conv2d: input and weight must be contiguous (call .contiguous())")
        }
        if wd[1] != xd[1] {
            bail!(
                "cudnn conv2d: weight {:?} does not take {} input channels",
                wl.shape(),
                xd[1]
            )
        }
        if self.stride == 0 || xd[2] + 2 * self.padding < wd[2] || xd[3] + 2 * self.padding < wd[3]
        {
            bail!(
                "cudnn conv2d: kernel {:?} larger than the padded input {:?} (padding {}), or stride 0",
                &wd[2..],
                &xd[2..],
                self.padding
            )
        }
        if xd.iter().chain(wd).any(|&d| d > i32::MAX as usize) {
            bail!("cudnn conv2d: dimension too large for cuDNN")
        }
        Ok(ConvKey {
            dtype,
            input: [xd[0], xd[1], xd[2], xd[3]],
            out_channels: wd[0],
            kernel: [wd[2], wd[3]],
            padding: self.padding,
            stride: self.stride,
        })
    }

    fn run<T>(
        &self,
        key: ConvKey,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage>
    where
        T: CudaDType + DeviceRepr + CudnnDataType + WithDType,
    {
        let dev = xs.device();
        let (x, w) = (view::<T>(xs, xl)?, view::<T>(ws, wl)?);
        let [n, cin, h, wd] = key.input;
        let [oh, ow] = key.out_hw();
        let out_len = n * key.out_channels * oh * ow;
        // SAFETY: cuDNN writes every output element (beta = 0).
        let mut out = unsafe { uninit::<T>(dev, out_len)? };

        STATE.with(|state| -> Result<()> {
            let mut state = state.borrow_mut();
            let st = match state.entry(dev.id()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(DeviceState {
                    cudnn: Cudnn::new(dev.cuda_stream())?,
                    algos: HashMap::new(),
                }),
            };
            let i = |v: usize| v as i32;
            let mut conv = st.cudnn.create_conv2d::<f32>(
                [i(key.padding), i(key.padding)],
                [i(key.stride), i(key.stride)],
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )?;
            conv.set_math_type(sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)?;
            let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
            let x_desc = st
                .cudnn
                .create_4d_tensor::<T>(nchw, [i(n), i(cin), i(h), i(wd)])?;
            let w_desc = st.cudnn.create_4d_filter::<T>(
                nchw,
                [
                    i(key.out_channels),
                    i(cin),
                    i(key.kernel[0]),
                    i(key.kernel[1]),
                ],
            )?;
            let y_desc = st
                .cudnn
                .create_4d_tensor::<T>(nchw, [i(n), i(key.out_channels), i(oh), i(ow)])?;
            let op = ConvForward {
                conv: &conv,
                x: &x_desc,
                w: &w_desc,
                y: &y_desc,
            };
            let (algo, ws_bytes) = match st.algos.get(&key) {
                Some(&chosen) => chosen,
                None => {
                    let chosen = choose_algorithm(&op)?;
                    st.algos.insert(key, chosen);
                    chosen
                }
            };
            // Taken from the stream-ordered pool per call (cheap; freed in stream order after
            // the conv) rather than kept, which would hold it while the transformer runs. Not
            // zero-filled: a workspace needs no initialisation.
            let mut workspace = if ws_bytes > 0 {
                // SAFETY: see above.
                Some(unsafe { uninit::<u8>(dev, ws_bytes)? })
            } else {
                None
            };
            // SAFETY: the descriptors describe exactly these contiguous NCHW buffers (checked
            // in `key`), and the workspace holds the algorithm's required bytes.
            unsafe {
                op.launch::<CudaSlice<u8>, _, _, _>(
                    algo,
                    workspace.as_mut(),
                    (T::from_f64(1.0), T::from_f64(0.0)),
                    &x,
                    &w,
                    &mut out,
                )?;
            }
            Ok(())
        })?;
        Ok(wrap(out, dev))
    }
}

/// cuDNN's heuristic ranking (`cudnnGetConvolutionForwardAlgorithm_v7`, which honours the
/// descriptor's tensor-op math type): the best-ranked algorithm whose workspace fits.
fn choose_algorithm<T: CudnnDataType>(
    op: &ConvForward<'_, T, f32, T>,
) -> Result<(sys::cudnnConvolutionFwdAlgo_t, usize)> {
    let first = op.pick_algorithm()?;
    let bytes = op.get_workspace_size(first)?;
    if bytes <= MAX_WORKSPACE_BYTES {
        return Ok((first, bytes));
    }
    // Rare: the top choice wants a huge workspace (FFT). Implicit precomputed GEMM needs
    // little and has tensor-core kernels for every shape the VAE uses.
    let fallback = sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM;
    Ok((fallback, op.get_workspace_size(fallback)?))
}

impl CustomOp2 for Conv2dTensorOps {
    fn name(&self) -> &'static str {
        "flux2-cudnn-conv2d"
    }

    cuda_only_cpu_fwd!(
        2,
        self,
        "the cuDNN conv2d op runs on CUDA only (callers use Tensor::conv2d on the CPU)"
    );

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dtype = xs.dtype();
        if ws.dtype() != dtype {
            bail!(
                "cudnn conv2d: input {dtype:?} and weight {:?} dtypes differ",
                ws.dtype()
            )
        }
        let key = self.key(xl, wl, dtype)?;
        let storage = match dtype {
            DType::BF16 => self.run::<half::bf16>(key, (xs, xl), (ws, wl))?,
            DType::F16 => self.run::<half::f16>(key, (xs, xl), (ws, wl))?,
            dt => bail!("cudnn conv2d: {dt:?} is not supported (bf16/f16 only)"),
        };
        let [oh, ow] = key.out_hw();
        Ok((
            storage,
            Shape::from((key.input[0], key.out_channels, oh, ow)),
        ))
    }
}

/// Whether [`conv2d`] handles `x`: a bf16/f16 CUDA tensor, with our speed paths on
/// ([`crate::ops::cuda_speedups_enabled`]; off, candle's `Tensor::conv2d` runs).
pub fn applies(x: &Tensor) -> bool {
    crate::ops::cuda_speedups_enabled()
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// `conv2d(x, weight)` without bias (dilation 1, one group), on cuDNN with tensor cores.
/// `x: [N, Cin, H, W]`, `weight: [Cout, Cin, kh, kw]`, same half dtype, on one CUDA device.
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &Conv2dTensorOps { padding, stride })
}
