//! The `flux2-klein` command line: a thin layer over `flux2_klein::pipeline`. It parses
//! arguments, checks everything cheap before any weights load, reports progress on stderr,
//! writes the image atomically and prints its path on stdout. No model code lives here.
//!
//! Exit codes (set by `main`): 0 success, 1 runtime failure (one `error: …` line on stderr),
//! 2 usage error (clap).

pub mod args;
mod bench;
mod compare;
mod device;
mod fetch;
mod generate;
mod output;
mod progress;
mod references;

use anyhow::Result;

pub use args::Cli;
use args::Command;
use progress::{Reporter, Verbosity};

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let verbosity = if cli.quiet {
        Verbosity::Quiet
    } else if cli.verbose {
        Verbosity::Verbose
    } else {
        Verbosity::Normal
    };
    let mut reporter = Reporter::new(verbosity);
    let result = match &cli.command {
        Command::Generate(a) => generate::run(a, &mut reporter),
        Command::Bench(a) => bench::run(a, &mut reporter),
        Command::Compare(a) => compare::run(a),
        Command::Fetch(a) => fetch::run(a, &mut reporter),
    };
    // Clear any live display before main prints the error line.
    reporter.finish();
    result
}

/// An error and its causes as one line: the messages of the chain joined by ": ", skipping a
/// cause the line already contains (library errors often repeat their source), with
/// newlines folded to spaces.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let msg = cause.to_string();
        let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
        if msg.is_empty() || line.contains(&msg) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&msg);
    }
    if let Some(hint) = hint_for(&line) {
        line.push_str(" — ");
        line.push_str(hint);
    }
    line
}

/// What to do about an error that names no fix itself (the raw device errors of candle /
/// cudarc / cuBLAS / cuDNN).
fn hint_for(line: &str) -> Option<&'static str> {
    const OUT_OF_MEMORY: [&str; 4] = [
        "CUDA_ERROR_OUT_OF_MEMORY",
        "CUBLAS_STATUS_ALLOC_FAILED",
        "CUDNN_STATUS_ALLOC_FAILED",
        "out of memory",
    ];
    if OUT_OF_MEMORY.iter().any(|m| line.contains(m)) {
        return Some(
            "the GPU ran out of memory: try a smaller --width/--height, --vae-tile 64, fewer \
             references, no --resident, or close other programs using the GPU",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn error_chain_is_one_line() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such\nfile");
        let err = Err::<(), _>(io)
            .context("cannot read x.json")
            .context("loading the model — pass --model DIR")
            .unwrap_err();
        assert_eq!(
            one_line(&err),
            "loading the model — pass --model DIR: cannot read x.json: no such file"
        );
        let dup = anyhow::anyhow!("inner").context("outer (inner)");
        assert_eq!(one_line(&dup), "outer (inner)");
    }

    #[test]
    fn device_out_of_memory_gets_a_hint() {
        let err = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")")
            .context("denoising step 1 of 4");
        let line = one_line(&err);
        assert!(line.starts_with("denoising step 1 of 4: DriverError(CUDA_ERROR_OUT_OF_MEMORY"));
        assert!(
            line.ends_with("or close other programs using the GPU"),
            "{line}"
        );
        let other = anyhow::anyhow!("cannot read x.png");
        assert_eq!(one_line(&other), "cannot read x.png");
    }
}
