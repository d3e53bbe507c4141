//! `flux2-klein fetch`: every file the pipeline reads, downloaded into the Hugging Face cache
//! (or found in a local directory), so later runs need no network (`HF_HUB_OFFLINE=1`). Prints
//! the model's directory on stdout.

use anyhow::{Context, Result};

use super::args::FetchArgs;
use super::common::print_stdout;
use super::progress::{fmt_bytes, Reporter, Verbosity};

/// The components with a config, and those of them with weights.
const CONFIGS: [&str; 4] = ["scheduler", "text_encoder", "transformer", "vae"];
const WEIGHTED: [&str; 3] = ["text_encoder", "transformer", "vae"];

pub fn run(args: &FetchArgs, reporter: &mut Reporter) -> Result<()> {
    // hf-hub's download bars on a terminal (nothing else draws while fetching); quiet in
    // scripts and with -q.
    flux2_klein::model_dir::show_download_progress(
        reporter.verbosity() != Verbosity::Quiet
            && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
    let dir = args.source.resolve()?;
    for component in CONFIGS {
        dir.config::<serde_json::Value>(component)
            .with_context(|| format!("the {component} config of {}", dir.label()))?;
    }
    dir.tokenizer()
        .with_context(|| format!("the tokenizer of {}", dir.label()))?;
    let mut total = 0u64;
    for component in WEIGHTED {
        reporter.info(&format!("{component}: weights"));
        let files = dir
            .weights(component)
            .with_context(|| format!("the {component} weights of {}", dir.label()))?;
        // Each file's header parsed and its tensors checked against its size: a truncated or
        // foreign file fails here, not at the first generate.
        let mut bytes = 0u64;
        for file in &files {
            flux2_klein::model_dir::check_weight_file(file)
                .with_context(|| format!("the {component} weights of {}", dir.label()))?;
            bytes += std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        }
        reporter.detail(&format!(
            "{component}: {} file(s), {}",
            files.len(),
            fmt_bytes(bytes)
        ));
        total += bytes;
    }
    if let Some(spec) = &args.transformer {
        let path = flux2_klein::weights::resolve::transformer_file(spec)?;
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        reporter.info(&format!(
            "--transformer {spec}: {} ({})",
            path.display(),
            fmt_bytes(bytes)
        ));
        total += bytes;
    }
    let root = dir
        .file("model_index.json")?
        .parent()
        .map(|p| p.to_path_buf())
        .context("model_index.json has no parent directory")?;
    reporter.info(&format!(
        "{}: complete, {} of weights",
        dir.label(),
        fmt_bytes(total)
    ));
    print_stdout(&format!("{}\n", root.display()))
}
