//! Prompt → Qwen3 token ids, exactly as diffusers' `Flux2KleinPipeline._get_qwen3_prompt_embeds`
//! tokenizes (spec §2.1).
//!
//! diffusers renders each prompt with the Qwen3 chat template (`add_generation_prompt=True`,
//! `enable_thinking=False`, no system message) and calls the tokenizer with
//! `padding="max_length", truncation=True, max_length=512`. For the stock Qwen3 tokenizer that
//! means: the template's `<|im_start|>`/`<|im_end|>`/`<think>`/`</think>` are parsed as the
//! special added tokens, no BOS or other special token is added (`add_bos_token: false`, the
//! post-processor is plain ByteLevel), truncation keeps the first 512 ids (right side) and
//! padding appends `<|endoftext|>` (151643) with attention mask 0 on the right.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use tokenizers::Tokenizer;

/// `<|endoftext|>`: Qwen3's `pad_token` (spec §2.1).
pub const PAD_TOKEN_ID: u32 = 151643;

/// The sequence length diffusers uses (`max_sequence_length=512`, spec §2.1).
pub const DEFAULT_MAX_LEN: usize = 512;

/// The Qwen3 chat template text for one user message with thinking disabled (spec §2.1):
/// `<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n`.
///
/// The prompt is inserted verbatim (the Jinja template does not strip user content).
pub fn chat_template(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
}

/// Token ids of a batch of prompts, padded/truncated to `max_len` like the pipeline does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    /// `[B][max_len]` ids: the (possibly truncated) template tokens, then [`PAD_TOKEN_ID`].
    pub input_ids: Vec<Vec<u32>>,
    /// `[B][max_len]`: 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<Vec<u32>>,
    /// Per prompt, the number of real (non-pad) tokens after truncation.
    pub real_len: Vec<usize>,
    /// Per prompt, how many tokens right truncation dropped (0 when the prompt fits). The CLI
    /// warns with it: diffusers silently cuts the end of the template (including
    /// `<|im_end|>` and the assistant header) for such prompts.
    pub truncated: Vec<usize>,
}

impl TokenBatch {
    /// Number of prompts.
    pub fn batch_size(&self) -> usize {
        self.input_ids.len()
    }

    /// Padded sequence length.
    pub fn seq_len(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }

    /// `(input_ids u32 [B,L], attention_mask u32 [B,L])` on `device`.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let (b, l) = (self.batch_size(), self.seq_len());
        let ids: Vec<u32> = self.input_ids.iter().flatten().copied().collect();
        let mask: Vec<u32> = self.attention_mask.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(ids, (b, l), device).context("building input_ids tensor")?;
        let mask =
            Tensor::from_vec(mask, (b, l), device).context("building attention_mask tensor")?;
        Ok((ids, mask))
    }
}

/// The Qwen3 tokenizer (`tokenizer/tokenizer.json`) plus the pipeline's padding rules.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    max_len: usize,
}

impl PromptTokenizer {
    /// Loads `tokenizer.json` (the fast-tokenizer file in the model's `tokenizer/` folder).
    /// `max_len` is diffusers' `max_sequence_length` (512, [`DEFAULT_MAX_LEN`]).
    pub fn from_file(tokenizer_json: &Path, max_len: usize) -> Result<Self> {
        if max_len == 0 {
            bail!("max_len must be at least 1 (diffusers uses max_sequence_length=512)");
        }
        let tokenizer = Tokenizer::from_file(tokenizer_json).map_err(|e| {
            anyhow::anyhow!(
                "loading the Qwen3 tokenizer from {}: {e} (expected the model's \
                 tokenizer/tokenizer.json)",
                tokenizer_json.display()
            )
        })?;
        Ok(Self { tokenizer, max_len })
    }

    /// The padded sequence length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Unpadded, untruncated ids of the chat-templated prompt.
    ///
    /// `add_special_tokens=true` mirrors transformers' default; with Qwen3's ByteLevel
    /// post-processor it adds nothing (no BOS), which the parity test checks.
    pub fn template_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let text = chat_template(prompt);
        let enc = self
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing prompt {prompt:?}: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokenizes every prompt (one at a time, as diffusers does) into `[B, max_len]` ids with
    /// right truncation and right padding.
    pub fn encode(&self, prompts: &[&str]) -> Result<TokenBatch> {
        if prompts.is_empty() {
            bail!("encode: no prompts given (pass at least one, \"\" for an empty prompt)");
        }
        let n = prompts.len();
        let mut batch = TokenBatch {
            input_ids: Vec::with_capacity(n),
            attention_mask: Vec::with_capacity(n),
            real_len: Vec::with_capacity(n),
            truncated: Vec::with_capacity(n),
        };
        for prompt in prompts {
            let mut ids = self.template_ids(prompt)?;
            let dropped = ids.len().saturating_sub(self.max_len);
            ids.truncate(self.max_len);
            let real = ids.len();
            let mut mask = vec![1u32; real];
            ids.resize(self.max_len, PAD_TOKEN_ID);
            mask.resize(self.max_len, 0);
            batch.input_ids.push(ids);
            batch.attention_mask.push(mask);
            batch.real_len.push(real);
            batch.truncated.push(dropped);
        }
        Ok(batch)
    }
}
