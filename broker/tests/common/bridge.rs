//! A real `covet bridge nats --config FILE` process for the bridge tests.
//! Its log (stderr, at info) goes to `bridge.log` beside the config, so a
//! failing test can show its tail; it is killed when its handle drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use super::process::{self, spawn_until_ready, Output};

pub struct Bridge {
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    /// The status endpoint, when the config sets `status.listen`.
    status: Option<String>,
    /// Flags after `--config FILE`.
    args: Vec<String>,
}

impl Bridge {
    /// Starts a bridge on `config` and waits (30 s at most) for its ready
    /// line. `status` is the config's `status.listen`, if it has one.
    pub fn start(config: &Path, status: Option<&str>) -> Bridge {
        Bridge::start_with_args(config, status, &[])
    }

    /// Like [`Bridge::start`], with more flags (`--nats URL`, ...).
    pub fn start_with_args(config: &Path, status: Option<&str>, args: &[&str]) -> Bridge {
        let mut b = Bridge {
            child: None,
            config: config.to_path_buf(),
            log: config.with_file_name("bridge.log"),
            status: status.map(str::to_string),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        b.spawn();
        b
    }

    /// Starts the process (again, after a kill or a stop).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the bridge is running already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the bridge log");
        let mut command = Command::new(super::covet_bin());
        command
            .args(["bridge", "nats", "--config"])
            .arg(&self.config)
            .args(&self.args)
            .stderr(log);
        let started = spawn_until_ready(
            &mut command,
            Output::Stdout,
            "covet bridge ready",
            Duration::from_secs(30),
            "covet bridge nats",
            || format!("; its log:\n{}", self.log_tail()),
        );
        self.child = Some(started.child);
    }

    pub fn kill9(&mut self) {
        process::kill9(&mut self.child);
    }

    /// Kill -9, and start again.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// SIGTERM, and the exit status if it exits within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        process::sigterm(self.child.as_ref().expect("bridge running"));
        process::wait_exit(&mut self.child, timeout)
    }

    /// SIGTERM; fails the test unless it exits 0 within 40 s (settling
    /// what is in flight takes up to the ack grace and a round trip).
    pub fn stop(&mut self) {
        let status = self.terminate(Duration::from_secs(40));
        assert!(
            status.is_some_and(|s| s.success()),
            "the bridge did not stop cleanly: {status:?}; its log:\n{}",
            self.log_tail()
        );
    }

    /// Everything the bridge logged, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its last 30 log lines.
    pub fn log_tail(&self) -> String {
        process::tail(&self.log(), 30)
    }

    /// Every route's row from the status endpoint.
    pub async fn routes(&self) -> Vec<covet_bridge::status::RouteReport> {
        let addr = self
            .status
            .as_deref()
            .expect("the config sets status.listen");
        covet_bridge::status::fetch(addr)
            .await
            .unwrap_or_else(|e| panic!("status of {addr}: {e:#}"))
    }

    /// The first route's row.
    pub async fn report(&self) -> covet_bridge::status::RouteReport {
        self.routes().await.into_iter().next().expect("a route")
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.kill9();
    }
}
