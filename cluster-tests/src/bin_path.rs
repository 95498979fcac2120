//! Finding (and building) the `covet` binary the clusters run.
//!
//! Cargo builds a package's own binaries before its integration tests, but
//! not the binaries of its dependencies, so `cargo test -p
//! covet-cluster-tests` alone would leave `covet` missing or stale. The
//! harness therefore runs `cargo build -p covet-broker --bin covet` once
//! per test process, into the target directory the test executable lives
//! in (`<target>/<profile>/deps/<test>`), and uses
//! `<target>/<profile>/covet`. Under `cargo test --workspace` the binary is
//! already fresh and that build is a no-op.
//!
//! `COVET_BIN=/path/to/covet` skips the build and uses that binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context};

/// The `covet` binary, built on first use; see the module docs.
pub fn covet_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn locate() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("COVET_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("COVET_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut profile_dir = exe
        .parent()
        .context("test executable has no directory")?
        .to_path_buf();
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir.pop();
    }
    let bin = profile_dir.join("covet");
    build(&profile_dir).with_context(|| format!("building {}", bin.display()))?;
    if !bin.is_file() {
        bail!("cargo built covet-broker but {} is missing", bin.display());
    }
    Ok(bin)
}

/// Runs `cargo build -p covet-broker --bin covet` for the profile whose
/// output directory is `profile_dir`.
fn build(profile_dir: &Path) -> anyhow::Result<()> {
    let target_dir = profile_dir
        .parent()
        .context("profile directory has no parent")?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("profile directory has no name")?;
    // Cargo sets the manifest directory at run time too; the compile-time
    // one is only a fallback (a shared target directory may hold a test
    // binary built from a checkout at another path).
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let workspace = manifest_dir
        .parent()
        .context("cluster-tests has no parent directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--quiet", "-p", "covet-broker", "--bin", "covet"])
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd.output().context("running cargo")?;
    if !out.status.success() {
        bail!(
            "cargo build failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
