//! The `flux2-klein` command line: a thin layer over `flux2_klein::pipeline`. It parses
//! arguments, checks everything cheap before any weights load, reports progress on stderr,
//! writes the image atomically and prints its path on stdout. No model code lives here.
//!
//! Exit codes (set by `main`): 0 success, 1 runtime failure (one `error: …` line on stderr),
//! 2 usage error (clap's message, on one line too); `compare`: 0 same or within tolerance, 1
//! different, 2 trouble (see [`exit_code`]); 130 / 143 when SIGINT / SIGTERM stopped the run
//! (`signals`).
//!
//! One file per subcommand (`generate`, `bench`, `compare`, `fetch`); `args` is the clap
//! definition, `jobs` the prompt-file format and the images of a run, `metadata` the settings
//! recorded in PNGs, `common` what `generate` and `bench` share.

pub mod args;
mod bench;
mod common;
mod compare;
mod device;
mod fetch;
mod generate;
mod info;
mod init_images;
mod jobs;
mod limits;
mod metadata;
mod output;
mod progress;
mod references;
mod remake;
mod serve;
mod signals;

use anyhow::Result;

pub use args::Cli;
use args::Command;
use progress::{Reporter, Verbosity};

/// Writes one line to stderr, the log stream. A stderr that cannot be written (`2>/dev/full`,
/// a closed pipe) loses the line, and nothing else: `eprintln!` would panic, and abort a run
/// whose images are finished. Control characters (from a path, a prompt, PNG metadata) are
/// escaped (`flux2_klein::text::escape_control`): a terminal would obey them. A multi-line
/// text (the profile table) keeps its line breaks.
pub fn log_line(line: &str) {
    use std::io::Write;
    let text: Vec<_> = line
        .split('\n')
        .map(flux2_klein::text::escape_control)
        .collect();
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{}", text.join("\n")).and_then(|()| err.flush());
}

/// The exit status of a failed run: 1, or 2 where `compare` could not compare
/// ([`compare::Trouble`]; 1 there means the images differ, as with cmp and diff).
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if let Some(c) = err.downcast_ref::<flux2_klein::pipeline::Cancelled>() {
        signals::exit_status(c.reason)
    } else if err.downcast_ref::<compare::Trouble>().is_some() {
        2
    } else {
        1
    }
}

/// The line a failed run ends with: `error: …` ([`error_line`]), or for a run stopped by a
/// signal "interrupted after k of n images".
pub fn failure_line(err: &anyhow::Error) -> String {
    match err.downcast_ref::<flux2_klein::pipeline::Cancelled>() {
        Some(c) => c.to_string(),
        None => format!("error: {}", error_line(err)),
    }
}

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
        Command::Info(a) => info::run(a),
        Command::Serve(a) => serve::run(a, &mut reporter),
    };
    // Clear any live display before main prints the error line.
    reporter.finish();
    result
}

/// An error and its causes as one line: the messages of the chain joined by ": ", skipping a
/// cause the line already contains (library errors often repeat their source), with
/// whitespace folded (`flux2_klein::one_line`).
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let msg = flux2_klein::one_line(&cause.to_string());
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

/// A clap usage error as one `error: …` line: the message with its details and tips, without
/// clap's usage block (which echoes the flags given), ending in where to read more. `argv` is
/// the command line that failed (for the subcommand to point at).
pub fn usage_error_line(err: &clap::Error, argv: &[std::ffi::OsString]) -> String {
    use clap::error::{ContextKind, ContextValue};
    let text = err.render().to_string();
    let mut line = String::new();
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if l.starts_with("Usage: ") || l.starts_with("For more information") {
            continue;
        } else if let Some(tip) = l.strip_prefix("tip: ") {
            line.push_str(&format!(" ({tip})"));
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(l);
        }
    }
    if !line.starts_with("error:") {
        line.insert_str(0, "error: ");
    }
    // `--guidance -3` reads as an unknown flag.
    if let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) {
        if arg.parse::<f64>().is_ok_and(|v| v < 0.0) {
            line.push_str(" (negative numbers are not accepted)");
        }
    }
    let command = <Cli as clap::CommandFactory>::command();
    let subcommand = argv.iter().skip(1).find_map(|a| {
        command
            .get_subcommands()
            .find(|c| {
                a.to_str()
                    .is_some_and(|a| c.get_name() == a || c.get_all_aliases().any(|n| n == a))
            })
            .map(|c| c.get_name())
    });
    let help = match subcommand {
        Some(name) => format!("flux2-klein {name} --help"),
        None => "flux2-klein --help".into(),
    };
    format!("{} — see {help}", flux2_klein::one_line(&line))
}

/// The message of a panic payload (`panic!` with a literal or with format arguments).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
}

/// What to do about an error that names no fix itself (the raw device errors of candle /
/// cudarc / cuBLAS / cuDNN). Only the GPU's own errors say "GPU": a CPU allocation that fails
/// says "out of memory" too.
fn hint_for(line: &str) -> Option<&'static str> {
    const GPU_OUT_OF_MEMORY: [&str; 3] = [
        "CUDA_ERROR_OUT_OF_MEMORY",
        "CUBLAS_STATUS_ALLOC_FAILED",
        "CUDNN_STATUS_ALLOC_FAILED",
    ];
    if GPU_OUT_OF_MEMORY.iter().any(|m| line.contains(m)) {
        return Some(
            "the GPU ran out of memory: try a smaller --width/--height, --vae-tile 64, fewer \
             references, no --resident, or close other programs using the GPU",
        );
    }
    let lower = line.to_ascii_lowercase();
    if [
        "out of memory",
        "memory allocation",
        "cannot allocate memory",
    ]
    .iter()
    .any(|m| lower.contains(m))
    {
        return Some(
            "the computer ran out of memory: try a smaller --width/--height, --vae-tile 64, \
             fewer references, no --resident, --dtype bf16, or close other programs",
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
            error_line(&err),
            "loading the model — pass --model DIR: cannot read x.json: no such file"
        );
        let dup = anyhow::anyhow!("inner").context("outer (inner)");
        assert_eq!(error_line(&dup), "outer (inner)");
    }

    #[test]
    fn device_out_of_memory_gets_a_hint() {
        let err = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")")
            .context("denoising step 1 of 4");
        let line = error_line(&err);
        assert!(line.starts_with("denoising step 1 of 4: DriverError(CUDA_ERROR_OUT_OF_MEMORY"));
        assert!(
            line.ends_with("or close other programs using the GPU"),
            "{line}"
        );
        let other = anyhow::anyhow!("cannot read x.png");
        assert_eq!(error_line(&other), "cannot read x.png");
        // A CPU allocation failure is not the GPU's.
        let cpu = anyhow::anyhow!("Cannot allocate memory (os error 12)").context("decode");
        let line = error_line(&cpu);
        assert!(line.contains("the computer ran out of memory"), "{line}");
        assert!(!line.contains("GPU"), "{line}");
    }

    #[test]
    fn usage_errors_are_one_line() {
        use clap::Parser;
        let line = |argv: &[&str]| {
            let argv: Vec<std::ffi::OsString> = argv.iter().map(|a| a.into()).collect();
            usage_error_line(&Cli::try_parse_from(&argv).unwrap_err(), &argv)
        };
        let l = line(&["flux2-klein", "generate", "-p", "x", "--bogus"]);
        assert!(
            l.starts_with("error: unexpected argument '--bogus' found"),
            "{l}"
        );
        assert!(l.ends_with(" — see flux2-klein generate --help"), "{l}");
        let l = line(&["flux2-klein", "generate", "--width", "8", "-p", "x"]);
        assert!(l.contains("--width") && l.contains("at least 16 px"), "{l}");
        assert!(l.ends_with(" — see flux2-klein generate --help"), "{l}");
        let l = line(&["flux2-klein", "generate", "-p", "x", "--seed", "-2"]);
        assert!(l.contains("-1 for a random one"), "{l}");
        assert!(!l.contains("Usage"), "{l}");
        let l = line(&["flux2-klein", "generate", "--ref-imag", "a.png", "-p", "x"]);
        assert!(l.contains("'--ref-image'"), "the tip stays: {l}");
        let l = line(&["flux2-klein", "generate"]);
        assert!(l.contains("required") && l.contains("--prompt"), "{l}");
        for l in [l, line(&["flux2-klein", "frobnicate"])] {
            assert!(!l.contains('\n') && l.starts_with("error: "), "{l}");
        }
    }

    #[test]
    fn panic_payloads() {
        let literal: Box<dyn std::any::Any + Send> = Box::new("boom");
        assert_eq!(panic_message(&*literal).as_deref(), Some("boom"));
        let formatted: Box<dyn std::any::Any + Send> = Box::new(format!("at {}", 3));
        assert_eq!(panic_message(&*formatted).as_deref(), Some("at 3"));
        assert_eq!(panic_message(&*Box::new(7u8)), None);
    }
}
