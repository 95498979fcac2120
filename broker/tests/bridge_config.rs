//! `covet bridge nats` refuses a bad configuration before it connects to
//! anything, naming the key; `covet bridge status` without a bridge says
//! so. (The routes themselves: bridge_*.rs, against a real nats-server.)

mod common;

use std::process::Command;

fn bridge(args: &[&str]) -> (bool, String) {
    let out = Command::new(common::covet_bin())
        .arg("bridge")
        .args(args)
        .output()
        .expect("run covet bridge");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[nats]\nurl = \"nats://127.0.0.1:1\"\nbogus = 1\n", "bogus"),
        (
            "[nats]\nurl = \"nats://127.0.0.1:1\"\n[[route]]\nname = \"in\"\nfrom_subject = \"a.>\"\n",
            "route \"in\": to_topic is missing",
        ),
        (
            "[[route]]\nname = \"out\"\nfrom_topic = \"t\"\nto_subject = \"x.{key}\"\n",
            "nats.url is missing",
        ),
        (
            "[nats]\nurl = \"nats://127.0.0.1:1\"\n[[route]]\nname = \"out\"\nfrom_topic = \"t\"\nto_subject = \"x.*.{key}\"\n",
            "route \"out\": to_subject",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (ok, err) = bridge(&["nats", "--config", path.to_str().unwrap()]);
        assert!(!ok, "{text:?} was accepted");
        assert!(
            err.contains(want),
            "{text:?}: {err:?} does not say {want:?}"
        );
    }
    // Flags make a route too, checked the same way.
    let (ok, err) = bridge(&[
        "nats",
        "--nats",
        "nats://127.0.0.1:1",
        "--from-topic",
        "t",
        "--to-subject",
        "a..b",
    ]);
    assert!(!ok);
    assert!(err.contains("to_subject"), "{err}");
}

#[test]
fn status_without_a_bridge_says_so() {
    let port = common::nats::free_port();
    let (ok, err) = bridge(&["status", "--bridge", &format!("127.0.0.1:{port}")]);
    assert!(!ok);
    assert!(err.contains("status endpoint"), "{err}");
}
