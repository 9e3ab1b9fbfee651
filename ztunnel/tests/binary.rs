//! The `ztunnel` binary refuses bad input with a message naming the problem (and building this
//! test also builds the binary the end-to-end tests in `mesh-tests` run).

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
        .args(args)
        .env_remove("ZTUNNEL_CA_ROOT")
        .output()
        .expect("run ztunnel");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_fail_with_a_clear_message() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["--worker-threads", "0"],
            "invalid value \"0\" for ZTUNNEL_WORKER_THREADS",
        ),
        (&["--drain-timeout", "soon"], "ZTUNNEL_DRAIN_TIMEOUT"),
        (
            &["--ca-address", "http://ca:15012"],
            "only reached over tls",
        ),
        (&["--no-such-flag"], "unexpected argument"),
        (
            &[
                "--local-config",
                "/zt.yaml",
                "--xds-address",
                "https://istiod:15012",
            ],
            "ZTUNNEL_LOCAL_CONFIG and ZTUNNEL_XDS_ADDRESS are both set",
        ),
        (
            &["--xds-address", "http://istiod:15012"],
            "control plane is only reached over tls",
        ),
    ];
    for (args, want) in cases {
        let (ok, stderr) = run(args);
        assert!(!ok, "{args:?} succeeded");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

#[test]
fn a_missing_ca_root_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("nope.pem");
    let (ok, stderr) = run(&[
        "--ca-root",
        root.to_str().unwrap(),
        "--admin-addr",
        "127.0.0.1:0",
        "--zds-socket",
        dir.path().join("zds.sock").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("cannot read the ca root certificate"),
        "{stderr}"
    );
    assert!(stderr.contains("nope.pem"), "{stderr}");
}
