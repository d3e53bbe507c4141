//! `FlowMatchEulerDiscreteScheduler` as `Flux2KleinPipeline` drives it (spec §7).
//!
//! The pipeline always passes explicit `sigmas = linspace(1, 1/n, n)` and
//! `mu = compute_empirical_mu(h·w, n)`; the scheduler turns them into shifted sigmas in numpy
//! float32 and the timesteps are `sigmas * 1000` in torch float32. Every op below is done in the
//! precision diffusers uses so the values are bit-identical (spec §7.1, [V]).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::path::Path;

/// `scheduler/scheduler_config.json`. Defaults are the diffusers class defaults (not the FLUX.2
/// values); unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub base_shift: Option<f64>,
    pub max_shift: Option<f64>,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    pub invert_sigmas: bool,
    pub shift_terminal: Option<f64>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    /// `"exponential"` or `"linear"`.
    pub time_shift_type: String,
    pub stochastic_sampling: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: Some(0.5),
            max_shift: Some(1.15),
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: "exponential".to_string(),
            stochastic_sampling: false,
        }
    }
}

impl SchedulerConfig {
    /// The FLUX.2 [klein] scheduler configuration (spec §0): dynamic shifting, exponential.
    pub fn flux2() -> Self {
        Self {
            shift: 3.0,
            use_dynamic_shifting: true,
            ..Self::default()
        }
    }

    /// Reads and validates the scheduler config file ([`crate::model_dir::read_config`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        crate::model_dir::read_config(path.as_ref())
    }

    /// Errors for settings diffusers supports but the klein pipeline never uses (and this port
    /// does not implement), instead of silently computing something else.
    pub fn validate(&self) -> Result<()> {
        if self.time_shift_type != "exponential" && self.time_shift_type != "linear" {
            bail!(
                "time_shift_type must be \"exponential\" or \"linear\", got {:?}",
                self.time_shift_type
            );
        }
        if self.num_train_timesteps == 0 {
            bail!("num_train_timesteps must be > 0");
        }
        let unsupported = [
            ("invert_sigmas", self.invert_sigmas),
            (
                "shift_terminal",
                self.shift_terminal.is_some_and(|v| v != 0.0),
            ),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
        ];
        for (name, on) in unsupported {
            if on {
                bail!("scheduler option `{name}` is not supported by this port (set it to its default)");
            }
        }
        Ok(())
    }
}

/// `compute_empirical_mu` of `pipeline_flux2_klein.py` (f64, spec §7.1). `image_seq_len` counts
/// only the target tokens (h·w), never the reference tokens.
pub fn compute_empirical_mu(image_seq_len: usize, num_steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05_f64, 1.89833333_f64);
    let (a2, b2) = (0.00016927_f64, 0.45666666_f64);
    let l = image_seq_len as f64;
    if image_seq_len > 4300 {
        return a2 * l + b2;
    }
    let m_200 = a2 * l + b2;
    let m_10 = a1 * l + b1;
    let a = (m_200 - m_10) / 190.0;
    let b = m_200 - 200.0 * a;
    a * num_steps as f64 + b
}

/// `numpy.linspace(1.0, 1/n, n)` in f64 (numpy's formula: `i*step + start`, last = stop).
pub fn linspace_sigmas(n: usize) -> Vec<f64> {
    let stop = 1.0 / n as f64;
    match n {
        0 => vec![],
        1 => vec![1.0],
        _ => {
            let step = (stop - 1.0) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + 1.0).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// The sigmas/timesteps of one pipeline call.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// `sigmas[i] * 1000` (f32), one per step.
    pub timesteps: Vec<f32>,
    /// n + 1 values, the last one 0.
    pub sigmas: Vec<f32>,
    /// The `mu` passed to `set_timesteps` (f64).
    pub mu: f64,
}

impl Schedule {
    /// What `retrieve_timesteps(scheduler, n, sigmas=linspace(1, 1/n, n), mu=...)` produces
    /// inside `Flux2KleinPipeline.__call__`, for `image_seq_len = h·w` target tokens.
    pub fn new(cfg: &SchedulerConfig, num_steps: usize, image_seq_len: usize) -> Result<Self> {
        if num_steps == 0 {
            bail!("num_steps must be at least 1");
        }
        let mu = compute_empirical_mu(image_seq_len, num_steps);
        let sigmas_in: Vec<f64> = linspace_sigmas(num_steps);
        Self::from_sigmas(cfg, &sigmas_in, mu)
    }

    /// `scheduler.set_timesteps(sigmas=sigmas_in, mu=mu)` for custom input sigmas.
    ///
    /// numpy float32 semantics (NEP 50, python scalars are "weak"): the input is cast to f32,
    /// python-float operands are cast to f32 *before* each op, every op rounds to f32.
    pub fn from_sigmas(cfg: &SchedulerConfig, sigmas_in: &[f64], mu: f64) -> Result<Self> {
        cfg.validate()?;
        if sigmas_in.is_empty() {
            bail!("at least one sigma is needed");
        }
        let sig: Vec<f32> = sigmas_in.iter().map(|&s| s as f32).collect();
        let shifted: Vec<f32> = if cfg.use_dynamic_shifting {
            // time_shift(mu, 1.0, t): (1/t - 1) ** 1.0 is exact, so it is dropped.
            let num = if cfg.time_shift_type == "exponential" {
                mu.exp() as f32 // math.exp(mu) → f32 when combined with the f32 array
            } else {
                mu as f32
            };
            sig.iter().map(|&t| num / (num + (1.0 / t - 1.0))).collect()
        } else {
            // shift * sigmas / (1 + (shift - 1) * sigmas); `shift - 1` is a python float op.
            let shift = cfg.shift as f32;
            let shift_m1 = (cfg.shift - 1.0) as f32;
            sig.iter()
                .map(|&s| shift * s / (1.0 + shift_m1 * s))
                .collect()
        };
        // timesteps = sigmas * num_train_timesteps (torch f32 tensor times a python int).
        let ntt = cfg.num_train_timesteps as f32;
        let timesteps = shifted.iter().map(|&s| s * ntt).collect();
        let mut sigmas = shifted;
        sigmas.push(0.0);
        Ok(Self {
            timesteps,
            sigmas,
            mu,
        })
    }

    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// `sigma_{i+1} - sigma_i` (0-dim f32 tensors in diffusers, so an f32 subtraction).
    pub fn dt(&self, step: usize) -> f32 {
        self.sigmas[step + 1] - self.sigmas[step]
    }
}

/// The `timestep` argument the pipeline feeds the transformer: `t.expand(B).to(latents.dtype)
/// / 1000` (spec §1). In bf16 `t` is rounded to bf16 first and the division rounds to bf16
/// (e.g. 967.384 → 968 → 0.96875); in f32 it is `t / 1000` in f32. Shape `[batch]`.
///
/// The division is an f32 true division followed by one rounding to `dtype` (what torch does
/// for bf16 on CPU and CUDA), so the value is the same on every device.
pub fn model_timestep(t: f32, batch: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let t_cast = match dtype {
        DType::F32 => t,
        DType::BF16 => half::bf16::from_f32(t).to_f32(),
        DType::F16 => half::f16::from_f32(t).to_f32(),
        other => bail!("model_timestep: unsupported latent dtype {other:?} (use F32, BF16 or F16)"),
    };
    let v = t_cast / 1000.0;
    Tensor::full(v, batch, device)
        .and_then(|x| x.to_dtype(dtype))
        .context("model_timestep: building the timestep tensor")
}

/// One flow-match Euler step `x + (sigma_next - sigma) * v` with diffusers' dtype rule
/// (spec §1, §7.2):
/// * f32: `x + f32(dt * v)`;
/// * bf16/f16: `dt` (a 0-dim f32 tensor) meets the bf16 `model_out`, so the product is a bf16
///   op with `dt` rounded to bf16; the sample was upcast to f32, so the sum is f32; the result is
///   cast back to the model output dtype:
///   `bf16( f32(x) + f32( bf16( bf16(dt) * v ) ) )`.
///
/// Each rounding is done explicitly (f32 op, then cast), so CPU and CUDA give the same bits.
/// `sample` and `model_out` must have the same shape; the result has `model_out`'s dtype.
pub fn euler_step(
    sample: &Tensor,
    model_out: &Tensor,
    sigma: f32,
    sigma_next: f32,
) -> Result<Tensor> {
    if sample.dims() != model_out.dims() {
        bail!(
            "euler_step: sample {:?} and model output {:?} differ in shape (slice the model output \
             to the target tokens first)",
            sample.dims(),
            model_out.dims()
        );
    }
    let dt = sigma_next - sigma;
    let dtype = model_out.dtype();
    let device = model_out.device();
    let x = sample.to_dtype(DType::F32)?;
    let out = match dtype {
        DType::F32 => {
            let dt_t = Tensor::new(dt, device)?;
            x.add(&model_out.broadcast_mul(&dt_t)?)?
        }
        DType::BF16 | DType::F16 => {
            let dt_r = if dtype == DType::BF16 {
                half::bf16::from_f32(dt).to_f32()
            } else {
                half::f16::from_f32(dt).to_f32()
            };
            let dt_t = Tensor::new(dt_r, device)?;
            // The product of two bf16 values is exact in f32; one rounding to bf16 follows.
            let prod = model_out
                .to_dtype(DType::F32)?
                .broadcast_mul(&dt_t)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?;
            (x + prod)?.to_dtype(dtype)?
        }
        other => bail!("euler_step: unsupported dtype {other:?}"),
    };
    Ok(out)
}

impl crate::model_dir::ComponentConfig for SchedulerConfig {
    const WHAT: &'static str = "scheduler config";

    fn validate(&self) -> Result<()> {
        SchedulerConfig::validate(self)
    }
}

#[cfg(test)]
#[allow(clippy::excessive_precision)] // golden values exactly as diffusers prints them
mod tests {
    use super::*;

    #[test]
    fn spec_golden_1024_4_steps() {
        let s = Schedule::new(&SchedulerConfig::flux2(), 4, 4096).unwrap();
        assert_eq!(s.mu, 2.291179894115571);
        assert_eq!(
            s.timesteps,
            vec![
                1000.0,
                967.384033203125,
                908.1439208984375,
                767.199951171875
            ]
        );
    }
}
