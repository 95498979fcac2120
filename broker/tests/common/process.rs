//! What every process the tests start shares: its output read line by
//! line on a thread, readiness as a line awaited with a deadline (never a
//! sleep), and bounded stops.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Which output of the child says it is ready.
#[derive(Clone, Copy)]
pub enum Output {
    Stdout,
    Stderr,
}

/// A started child, its output lines after the ready line, and that line.
pub struct Started {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub ready_line: String,
}

/// Spawns `command` with `output` piped and waits up to `timeout` for a
/// line containing `ready`. On a timeout (or the output closing) the child
/// is killed and the test fails with `what` and whatever `diagnose` adds
/// (a log tail, say).
pub fn spawn_until_ready(
    command: &mut Command,
    output: Output,
    ready: &str,
    timeout: Duration,
    what: &str,
    diagnose: impl Fn() -> String,
) -> Started {
    match output {
        Output::Stdout => command.stdout(Stdio::piped()),
        Output::Stderr => command.stderr(Stdio::piped()),
    };
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let pipe: Box<dyn Read + Send> = match output {
        Output::Stdout => Box::new(child.stdout.take().expect("stdout piped")),
        Output::Stderr => Box::new(child.stderr.take().expect("stderr piped")),
    };
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        // Reads to the end even when nobody listens any more, so the
        // child never blocks on a full pipe.
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(ready) => {
                return Started {
                    child,
                    lines,
                    ready_line: line,
                }
            }
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{what} did not print \"{ready}\" within {timeout:?} ({e}){}",
                    diagnose()
                );
            }
        }
    }
}

/// SIGKILL, then waits for the process to be gone.
pub fn kill9(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Sends SIGTERM.
pub fn sigterm(child: &Child) {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -TERM {} failed", child.id());
}

/// Waits up to `timeout` for the process to exit; the child stays in
/// `child` (killed on drop) when it does not.
pub fn wait_exit(child: &mut Option<Child>, timeout: Duration) -> Option<ExitStatus> {
    let c = child.as_mut()?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = c.try_wait() {
            *child = None;
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
