//! Prompt encoding: prompts → Qwen3 hidden states → `prompt_embeds` `[B, L, n·H]`, equal to
//! diffusers' `Flux2KleinPipeline.encode_prompt` / `_get_qwen3_prompt_embeds` (spec §2).
//!
//! * [`prompt`]: chat template, tokenization, padding/truncation (spec §2.1).
//! * [`qwen3`]: the Qwen3 decoder stack up to the deepest requested layer (spec §2.2).
//! * [`encode_prompts`]: stacking of the requested hidden states (spec §2.3).

pub mod prompt;
pub mod qwen3;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

pub use prompt::{chat_template, PromptTokenizer, TokenBatch, DEFAULT_MAX_LEN, PAD_TOKEN_ID};
pub use qwen3::{Qwen3Config, Qwen3TextEncoder};

/// diffusers' default `text_encoder_out_layers` (spec §2.2): hidden states after 9, 18 and 27
/// decoder layers, no final norm.
pub const DEFAULT_LAYERS: [usize; 3] = [9, 18, 27];

/// Output of [`encode_prompts`].
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[B, L, len(layers)·H]` in the encoder's dtype; channel `c` of a token is
    /// `hidden_states[layers[c / H]]`, feature `c % H` (spec §2.3).
    pub embeds: Tensor,
    /// Per prompt, tokens dropped by right truncation (0 = the prompt fit).
    pub truncated: Vec<usize>,
}

/// Encodes `prompts` like diffusers' `_get_qwen3_prompt_embeds`: template + tokenize each
/// prompt, run Qwen3 on the batch, and concatenate per token the hidden states of `layers`
/// (`[layer a | layer b | layer c]`, = `stack(dim=1).permute(0,2,1,3).reshape`, spec §2.3).
///
/// Identical prompts are run once and their embeddings reused (each row of the encoder is
/// independent of the others, so this changes nothing numerically).
pub fn encode_prompts(
    tokenizer: &PromptTokenizer,
    encoder: &Qwen3TextEncoder,
    prompts: &[&str],
    layers: &[usize],
) -> Result<PromptEmbeds> {
    if prompts.is_empty() {
        bail!("encode_prompts: no prompts given");
    }
    if layers.is_empty() {
        bail!("encode_prompts: no hidden-state layers given (diffusers' default is [9, 18, 27])");
    }
    // Deduplicate: `unique` holds each distinct prompt once, `row[i]` its index there.
    let mut unique: Vec<&str> = Vec::new();
    let mut row: Vec<u32> = Vec::with_capacity(prompts.len());
    for p in prompts {
        let idx = match unique.iter().position(|u| u == p) {
            Some(i) => i,
            None => {
                unique.push(p);
                unique.len() - 1
            }
        };
        row.push(idx as u32);
    }
    let tokens = tokenizer.encode(&unique)?;
    // On the host: the encoder moves the ids to its device and reads the padding from the
    // mask without a round trip.
    let (ids, mask) = tokens.to_tensors(&candle_core::Device::Cpu)?;
    let hidden = encoder
        .forward(&ids, &mask, layers)
        .context("running the Qwen3 text encoder")?;
    let embeds = Tensor::cat(&hidden, candle_core::D::Minus1)?;
    let embeds = if unique.len() == prompts.len() {
        embeds
    } else {
        let idx = Tensor::from_vec(row.clone(), prompts.len(), encoder.device())?;
        embeds.index_select(&idx, 0)?
    };
    let truncated = row.iter().map(|&i| tokens.truncated[i as usize]).collect();
    Ok(PromptEmbeds { embeds, truncated })
}
