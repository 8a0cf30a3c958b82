//! Bad input gets a clear answer and loses nothing: bad flags exit 2 with a clear message
//! before serving; bad requests get the right 4xx without disturbing other connections.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Flags the parser rejects: exit 2 with clap's whole message (issue 11: it used to be
/// cut to its first line, which for a missing flag did not even name it).
#[test]
fn bad_flags_exit_2_with_the_whole_message() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["proxy", "--drain-max", "soon"], &["--drain-max", "soon"]),
        // Before: accepted, then a panic on clock overflow at the end of the drain.
        (&["proxy", "--drain-max", "300000000000y"], &["--drain-max"]),
        (
            &["proxy", "--idle-timeout", "48h"],
            &["--idle-timeout", "longer than 1day"],
        ),
        (&["proxy", "--listen", "not-an-address"], &["--listen"]),
        (&["proxy", "--upstream", "no-port"], &["--upstream"]),
        (&["proxy", "--health-path", "healthz"], &["absolute path"]),
        (
            &["proxy", "--log-format", "xml"],
            &["--log-format", "possible values: text, json"],
        ),
        (
            &["proxy", "--upstream-protocol", "spdy"],
            &["possible values: http1, h2c"],
        ),
        (
            &["proxy", "--no-such-flag"],
            &["--no-such-flag", "Usage: lameduck proxy"],
        ),
        (&["frobnicate"], &["frobnicate", "Usage: lameduck"]),
        (
            &["webhook"],
            &[
                "required arguments were not provided",
                "--tls-cert <FILE>",
                "--tls-key <FILE>",
                "Usage: lameduck webhook",
            ],
        ),
    ];
    for (args, needles) in cases {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        for needle in *needles {
            assert!(err.contains(needle), "{args:?}: no {needle:?} in\n{err}");
        }
    }
}

/// Flags that parse but do not make sense together: one line naming them, exit 2.
#[test]
fn invalid_combinations_exit_2_with_one_line() {
    let (code, err) = run(&["proxy", "--drain-min", "1m", "--drain-max", "30s"]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--drain-min (1m) must not exceed --drain-max (30s)"),
        "{err}"
    );
}

/// Configuration that would loop, drain at once or leave /drain open (issue 21): refused at
/// start, exit 2, one line naming the flags. Before: each of these was accepted.
#[test]
fn dangerous_configuration_is_refused_with_one_line() {
    // (flags, environment, what the one line must say)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        // The upstream is the proxy's own traffic port: one request fanned out into ~10,000
        // self-connections.
        (
            &[
                "--listen",
                "127.0.0.1:18080",
                "--upstream",
                "127.0.0.1:18080",
            ],
            &[],
            &["--upstream 127.0.0.1:18080", "own --listen"],
        ),
        // ... on every address, reached through loopback.
        (
            &["--listen", "0.0.0.0:18080", "--upstream", "127.0.0.1:18080"],
            &[],
            &["own --listen 0.0.0.0:18080"],
        ),
        (
            &["--listen", "[::]:18080", "--upstream", "127.0.0.1:18080"],
            &[],
            &["own --listen [::]:18080"],
        ),
        (
            &["--admin", "0.0.0.0:19901", "--upstream", "localhost:19901"],
            &[],
            &["own --admin 0.0.0.0:19901"],
        ),
        (
            &["--upstream", "127.0.0.1:0"],
            &[],
            &["--upstream", "port 0"],
        ),
        (
            &["--quiet", "0s"],
            &[],
            &["--quiet (0s) must be at least 1s"],
        ),
        (
            &["--quiet-fallback", "0s"],
            &[],
            &["--quiet-fallback (0s) must be at least 1s"],
        ),
        (&["--quiet", "500ms"], &[], &["--quiet (500ms)"]),
        (
            &["--drain-token", ""],
            &[],
            &["--drain-token", "0 characters", "16 to 256"],
        ),
        (
            &["--drain-token", "short"],
            &[],
            &["--drain-token", "5 characters"],
        ),
        (
            &["--drain-token", "abcdefghijklmnop\nq"],
            &[],
            &["--drain-token", "'\\n'"],
        ),
        // An empty variable is a mistake, not "no token": unset it for that.
        (
            &[],
            &[("LAMEDUCK_DRAIN_TOKEN", "")],
            &["LAMEDUCK_DRAIN_TOKEN", "unset it for no token"],
        ),
        // A drain record that is no file: a drain would go unrecorded, silently.
        (
            &["--drain-record", ""],
            &[],
            &["--drain-record", "must name a file"],
        ),
        (
            &[],
            &[("LAMEDUCK_DRAIN_RECORD", "/var/run/lameduck/")],
            &["--drain-record \"/var/run/lameduck/\"", "must name a file"],
        ),
    ];
    for (flags, env, needles) in cases {
        let mut args = vec!["proxy"];
        args.extend_from_slice(flags);
        let out = Command::new(BIN)
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?} {env:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{flags:?}: {err}");
        for needle in *needles {
            assert!(err.contains(needle), "{flags:?}: no {needle:?} in\n{err}");
        }
    }
}

/// A negative duration or number names the flag and the problem. Before: clap's
/// "unexpected argument '-1'", which named neither.
#[test]
fn negative_values_name_the_flag() {
    for (flag, value, needle) in [
        ("--drain-max", "-1s", "-1s is negative"),
        ("--quiet", "-5s", "-5s is negative"),
        ("--idle-timeout", "-1s", "-1s is negative"),
        ("--threads", "-1", "--threads"),
        ("--max-connections", "-1", "--max-connections"),
    ] {
        let (code, err) = run(&["proxy", flag, value]);
        assert_eq!(code, Some(2), "{flag} {value}: {err}");
        assert!(
            err.contains(&format!("invalid value '{value}' for '{flag}")),
            "{flag} {value}: {err}"
        );
        assert!(
            err.contains(needle),
            "{flag} {value}: no {needle:?} in\n{err}"
        );
    }
}

/// TLS flags that cannot work: exit 2, one line naming the flag or the file, before
/// anything is served.
#[test]
fn bad_tls_flags_exit_2() {
    let dir = std::env::temp_dir().join(format!("lameduck-badtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let junk = junk.to_str().unwrap();
    let missing = dir.join("missing.pem");
    let missing = missing.to_str().unwrap();
    let listen = ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--tls",
                "self-signed",
                "--tls-cert",
                junk,
                "--tls-key",
                junk,
            ],
            "cannot be used with",
        ),
        (&["--tls-cert", junk], "--tls-key"),
        (&["--tls-key", junk], "--tls-cert"),
        (&["--tls", "acme"], "possible values: self-signed"),
        (&["--tls-cert", missing, "--tls-key", junk], "missing.pem"),
        (
            &["--tls-cert", junk, "--tls-key", junk],
            "junk.pem: no certificate",
        ),
        (&["--mode", "tcp", "--tls", "self-signed"], "--mode http"),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["proxy"];
        args.extend_from_slice(&listen);
        args.extend_from_slice(flags);
        let (code, err) = run(&args);
        assert_eq!(code, Some(2), "{flags:?}: {err}");
        assert!(err.contains(needle), "{flags:?}: no {needle:?} in\n{err}");
        assert!(!err.contains("panicked"), "{flags:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bare `lameduck` prints the help (with the subcommands), exit 2.
#[test]
fn bare_lameduck_prints_help() {
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2), "{err}");
    for sub in ["proxy", "drain", "inject", "webhook", "Usage: lameduck"] {
        assert!(err.contains(sub), "no {sub:?} in\n{err}");
    }
}

#[test]
fn env_vars_are_read_and_checked() {
    let out = Command::new(BIN)
        .args(["proxy"])
        .env("LAMEDUCK_DRAIN_MAX", "forever")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--drain-max"));
}

#[test]
fn port_in_use_exits_2_before_serving() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, err) = run(&["proxy", "--listen", &addr, "--admin", "127.0.0.1:0"]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("cannot listen on {addr} (--listen)")),
        "{err}"
    );
}

#[test]
fn help_and_version_exit_0() {
    let out = Command::new(BIN)
        .args(["proxy", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--upstream",
        "--admin",
        "--drain-min",
        "--quiet",
        "--drain-max",
        "--health-path",
        "--upstream-health",
        "--log-format",
        "--drain-token",
        "--upstream-connect-timeout",
        "--idle-timeout",
        "--header-read-timeout",
        "--upstream-idle-timeout",
        "--upstream-protocol",
        "LAMEDUCK_DRAIN_MAX",
        "terminationGracePeriodSeconds",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[tokio::test]
async fn malformed_requests_get_4xx_and_do_not_disturb_other_connections() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(up.addr, &["--header-read-timeout", "500ms"]);
    // A good keep-alive connection that must survive everything below.
    let mut good = H1::connect(p.traffic).await;
    assert_eq!(good.get("/").await.unwrap().status, 200);

    let t = Duration::from_secs(5);
    let r = raw(p.traffic, b"NOT A REQUEST LINE\r\n\r\n", t).await;
    assert!(
        r.starts_with("HTTP/1.1 400"),
        "malformed request line: {r:?}"
    );

    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(80 * 1024)
    );
    let r = raw(p.traffic, big.as_bytes(), t).await;
    assert!(r.starts_with("HTTP/1.1 431"), "oversized headers: {r:?}");

    // Both framings: the transfer coding wins and the connection closes after the answer
    // (RFC 9112 §6.3; tests/hardening.rs shows nothing can be smuggled behind it).
    let r = raw(
        p.traffic,
        b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        t,
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "conflicting CL/TE: {r:?}");
    assert!(
        r.to_ascii_lowercase().contains("connection: close"),
        "{r:?}"
    );

    let r = raw(
        p.traffic,
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        t,
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 400"),
        "conflicting Content-Length: {r:?}"
    );

    // Slowloris: a head that never completes is closed after the header timeout.
    let started = Instant::now();
    let r = raw(p.traffic, b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ", t).await;
    let took = started.elapsed();
    assert!(r.is_empty(), "{r:?}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(4),
        "{took:?}"
    );

    assert_eq!(good.get("/").await.unwrap().status, 200);
    assert!(p.logs().iter().all(|l| !l.contains("panicked")));
}

/// `--sidecar-default` with a key that is no per-pod setting: exit 2 naming it, before
/// anything is read or served.
#[test]
fn unknown_sidecar_default_exits_2() {
    let (code, err) = run(&[
        "inject",
        "--sidecar-default",
        "lameduck.io/drain_max=90s",
        "-f",
        "/nonexistent",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("lameduck.io/drain_max"), "{err}");
    assert!(err.contains("not a per-pod setting"), "{err}");
}
