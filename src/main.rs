//! `flux2-klein`: parse, run, map errors to exit codes (0 ok, 1 runtime failure, 2 usage).

mod cli;

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

fn main() -> ExitCode {
    // --help/--version print and exit 0 (a bare command prints its help and exits 2); usage
    // errors are one line and exit 2, like every other error.
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `help --help` would be clap's "unrecognized subcommand '--help'": it means `help`.
    if argv.len() == 3 && argv[1] == "help" && (argv[2] == "--help" || argv[2] == "-h") {
        argv.pop();
    }
    let args = match cli::Cli::try_parse_from(&argv) {
        Ok(args) => args,
        Err(e)
            if !e.use_stderr()
                || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            cli::log_line(&cli::usage_error_line(&e, &argv));
            return ExitCode::from(2);
        }
    };

    // A panic is a bug, but the user still gets one line and exit code 1 (the full report
    // with RUST_BACKTRACE set).
    std::panic::set_hook(Box::new(|info| {
        let msg = cli::panic_message(info.payload()).unwrap_or_else(|| "unknown panic".into());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        cli::log_line(&format!(
            "error: internal error ({}{place}) — this is a bug in flux2-klein; please report it \
             with the command line (RUST_BACKTRACE=1 shows more)",
            flux2_klein::one_line(&msg)
        ));
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            cli::log_line(&std::backtrace::Backtrace::force_capture().to_string());
        }
    }));

    match std::panic::catch_unwind(|| cli::run(args)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            cli::log_line(&cli::failure_line(&e));
            ExitCode::from(cli::exit_code(&e))
        }
        Err(_) => ExitCode::from(1),
    }
}
