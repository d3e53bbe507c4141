//! `flux2-klein`: parse, run, map errors to exit codes (0 ok, 1 runtime failure, 2 usage).

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Usage errors: clap prints them and exits with 2; --help/--version exit with 0.
    let args = cli::Cli::parse();

    // A panic is a bug, but the user still gets one line and exit code 1 (the full report
    // with RUST_BACKTRACE set).
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error ({}{place}) — this is a bug in flux2-klein; please report it \
             with the command line (RUST_BACKTRACE=1 shows more)",
            msg.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            eprintln!("{}", std::backtrace::Backtrace::force_capture());
        }
    }));

    match std::panic::catch_unwind(|| cli::run(args)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", cli::one_line(&e));
            ExitCode::from(1)
        }
        Err(_) => ExitCode::from(1),
    }
}
