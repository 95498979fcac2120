//! `covet`: the broker and its command line.
//!
//! Every client command takes `--broker HOST:PORT[,...]` (default from
//! `COVET_BROKER`, else 127.0.0.1:7420). Failures print one line on stderr,
//! starting with the stable reason when the broker gave one, and exit
//! non-zero.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let started = std::time::Instant::now();
    let args = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("covet: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args, started)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("covet: error: {}", cli::describe_error(&e));
            ExitCode::FAILURE
        }
    }
}
