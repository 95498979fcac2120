//! `covet-powerfs`: mounts the power-loss filesystem in the foreground.
//!
//! ```text
//! covet-powerfs mount BACKING MOUNTPOINT [--seed N] [--tear] [--reorder] [--no-sync-backing]
//! ```
//!
//! Prints `mounted BACKING on MOUNTPOINT pid PID` once the mount is usable.
//! `kill -USR1 PID` cuts power (with the faults chosen by the flags) and
//! prints `power cut: files=.. writes_discarded=.. ...`; `kill -TERM PID` (or
//! Ctrl-C) unmounts cleanly and prints `unmounted`. Either way it exits 0
//! when the backing directory ended in the intended state.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use covet_powerfs::{CutOptions, MountOptions, PowerFs};

#[derive(Parser)]
#[command(
    name = "covet-powerfs",
    about = "A FUSE filesystem that loses unsynced data at a simulated power cut"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount BACKING on MOUNTPOINT until SIGUSR1 (power cut) or SIGTERM/SIGINT (clean unmount).
    Mount {
        backing: PathBuf,
        mountpoint: PathBuf,
        /// Seed of the cut's faults.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Tear the last unsynced write of each file at a random byte.
        #[arg(long)]
        tear: bool,
        /// Let a random subset of each file's unsynced writes reach the disk.
        #[arg(long)]
        reorder: bool,
        /// Do not fsync the backing files (faster; the host must not lose power).
        #[arg(long)]
        no_sync_backing: bool,
    },
}

fn main() -> ExitCode {
    let Command::Mount {
        backing,
        mountpoint,
        seed,
        tear,
        reorder,
        no_sync_backing,
    } = Cli::parse().command;
    // Block the control signals before any thread starts, so every thread
    // inherits the mask and only `sigwait` below receives them.
    let signals = match block_signals(&[libc::SIGUSR1, libc::SIGTERM, libc::SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("covet-powerfs: blocking signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = MountOptions {
        sync_backing: !no_sync_backing,
    };
    let fs = match PowerFs::mount(&backing, &mountpoint, opts) {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("covet-powerfs: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "mounted {} on {} pid {}",
        backing.display(),
        mountpoint.display(),
        std::process::id()
    );
    loop {
        let mut sig = 0;
        // SAFETY: `signals` is an initialised set and `sig` is writable.
        if unsafe { libc::sigwait(&signals, &mut sig) } != 0 {
            continue;
        }
        if sig == libc::SIGUSR1 {
            return match fs.power_cut(CutOptions {
                seed,
                tear,
                reorder,
            }) {
                Ok(s) => {
                    println!(
                        "power cut: files={} writes_discarded={} writes_applied={} bytes_discarded={} files_torn={} dir_changes_reverted={} errors={}",
                        s.files_with_unsynced_data,
                        s.writes_discarded,
                        s.writes_applied,
                        s.bytes_discarded,
                        s.files_torn,
                        s.dir_changes_reverted,
                        s.errors.len()
                    );
                    for e in &s.errors {
                        eprintln!("covet-powerfs: {e}");
                    }
                    if s.errors.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("covet-powerfs: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        return match fs.unmount() {
            Ok(()) => {
                println!("unmounted");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("covet-powerfs: {e}");
                ExitCode::FAILURE
            }
        };
    }
}

fn block_signals(sigs: &[libc::c_int]) -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set;
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}
