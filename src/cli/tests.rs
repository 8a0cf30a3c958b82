//! Tests of the command line: defaults, values, validation.

use super::*;

fn proxy(args: &[&str]) -> Result<ProxyArgs, String> {
    let mut argv = vec!["lameduck", "proxy"];
    argv.extend_from_slice(args);
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Proxy(p),
        }) => p.validate().map(|_| p).map_err(|e| e.to_string()),
        Ok(_) => unreachable!(),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn an_upstream_that_reaches_the_proxy_itself() {
    let a = |s: &str| s.parse::<SocketAddr>().unwrap();
    let cases = [
        ("127.0.0.1:8080", "127.0.0.1:8080", true),
        ("127.0.0.1:8080", "0.0.0.0:8080", true),
        ("127.0.0.1:8080", "[::]:8080", true),
        ("[::1]:8080", "0.0.0.0:8080", true),
        ("0.0.0.0:8080", "127.0.0.1:8080", true),
        ("[::ffff:127.0.0.1]:8080", "127.0.0.1:8080", true),
        // Another port, or another address of the same port: the app.
        ("127.0.0.1:3000", "0.0.0.0:8080", false),
        ("127.0.0.1:8080", "127.0.0.2:8080", false),
        ("10.0.0.5:8080", "127.0.0.1:8080", false),
        // Port 0 binds an ephemeral port: never the upstream's.
        ("127.0.0.1:0", "127.0.0.1:0", false),
    ];
    for (up, own, want) in cases {
        assert_eq!(reaches(a(up), a(own)), want, "{up} -> {own}");
    }
}

#[test]
fn readiness_while_draining_values() {
    use ReadinessWhileDraining::*;
    assert_eq!(proxy(&[]).unwrap().readiness_while_draining, Fail);
    for (v, want) in [
        ("fail", Fail),
        ("keep", Keep),
        ("10s", For(Duration::from_secs(10))),
    ] {
        let p = proxy(&["--readiness-while-draining", v]).unwrap();
        assert_eq!(p.readiness_while_draining, want, "{v}");
    }
    let e = proxy(&["--readiness-while-draining", "sometimes"]).unwrap_err();
    assert!(e.contains("or fail, or keep"), "{e}");
}

#[test]
fn drain_tokens_follow_the_injection_rule() {
    assert!(check_drain_token("0123456789abcdef").is_ok());
    assert!(check_drain_token(&"a".repeat(256)).is_ok());
    assert!(check_drain_token("AZaz09._~+/=-xyz").is_ok());
    for bad in [
        "",
        "short",
        &"a".repeat(257),
        "0123456789abcdef\n",
        "0123456789 abcdef",
    ] {
        assert!(check_drain_token(bad).is_err(), "{bad:?}");
    }
    // 16 multi-byte characters are 16 characters, and not of the alphabet.
    assert!(check_drain_token(&"é".repeat(16))
        .unwrap_err()
        .contains("'é'"));
}

#[test]
fn defaults() {
    let p = proxy(&[]).unwrap();
    assert_eq!(p.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(p.upstream.to_string(), "127.0.0.1:3000");
    assert_eq!(p.admin.to_string(), "0.0.0.0:9901");
    assert_eq!(p.drain_min, Duration::from_secs(5));
    assert_eq!(p.quiet, QuietArg::Auto);
    assert_eq!(p.quiet_fallback, Duration::from_secs(30));
    assert_eq!(p.health_check_agents, ["ELB-HealthChecker", "GoogleHC"]);
    assert_eq!(p.drain_max, Duration::from_secs(120));
    assert!(
        p.idle_timeout > Duration::from_secs(60),
        "must outlast the ALB's idle timeout"
    );
    assert_eq!(p.upstream_protocol, Protocol::Http1);
    assert_eq!(p.drain_record, None, "no record unless asked for");
}

/// `--drain-record` names a file; its directory is checked only by the running proxy (the
/// injected path exists only in the pod).
#[test]
fn drain_record_names_a_file() {
    let p = proxy(&["--drain-record", "/var/run/lameduck/draining"]).unwrap();
    assert_eq!(
        p.drain_record.as_deref(),
        Some(std::path::Path::new("/var/run/lameduck/draining"))
    );
    assert!(proxy(&["--drain-record", "draining"]).is_ok(), "relative");
    for bad in ["", " ", "/var/run/lameduck/", "/", "/var/run/.."] {
        let e = ProxyArgs::parse_and_validate([format!("--drain-record={bad}")]).unwrap_err();
        assert_eq!(e.flags, ["--drain-record"], "{bad:?}: {e}");
        assert_eq!(e.message.lines().count(), 1, "{e}");
        assert!(e.message.contains("must name a file"), "{e}");
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    assert!(parse_duration("10").is_err());
    assert!(parse_duration("soon").is_err());
}

#[test]
fn bad_combinations_are_rejected() {
    let e = proxy(&["--drain-min", "10s", "--drain-max", "5s"]).unwrap_err();
    assert!(
        e.contains("--drain-min (10s) must not exceed --drain-max (5s)"),
        "{e}"
    );
    let e = proxy(&["--quiet", "3m"]).unwrap_err();
    assert!(e.contains("--quiet (3m)"), "{e}");
    let e = proxy(&["--quiet-fallback", "3m"]).unwrap_err();
    assert!(e.contains("--quiet-fallback (3m)"), "{e}");
    assert!(proxy(&["--quiet", "sometimes"]).is_err());
    assert_eq!(
        proxy(&["--quiet", "15s"]).unwrap().quiet,
        QuietArg::Fixed(Duration::from_secs(15))
    );
    assert_eq!(
        proxy(&["--health-check-agents", "ELB-HealthChecker,kube-probe"])
            .unwrap()
            .health_check_agents,
        ["ELB-HealthChecker", "kube-probe"]
    );
    assert!(proxy(&["--listen", "nonsense"]).is_err());
    assert!(proxy(&["--health-path", "healthz"]).is_err());
    assert!(proxy(&["--upstream-protocol", "spdy"]).is_err());
    let e = proxy(&["--listen", "127.0.0.1:9901", "--admin", "127.0.0.1:9901"]).unwrap_err();
    assert!(e.contains("must differ"), "{e}");
}

#[test]
fn proxy_args_checked_for_injection() {
    let p = ProxyArgs::parse_and_validate(["--listen=[::]:9900", "--drain-max=60s"]).unwrap();
    assert_eq!(p.listen.to_string(), "[::]:9900");
    assert_eq!(p.drain_max, Duration::from_secs(60));
    let e = ProxyArgs::parse_and_validate(["--drain-min=2m", "--drain-max=1m"]).unwrap_err();
    assert!(
        e.message.contains("--drain-min (2m) must not exceed"),
        "{e}"
    );
    assert_eq!(e.flags, ["--drain-min", "--drain-max"]);
    let e = ProxyArgs::parse_and_validate(["--upstream-protocol=spdy"]).unwrap_err();
    assert_eq!(e.message.lines().count(), 1, "{e}");
    assert!(e.message.contains("--upstream-protocol"), "{e}");
}

/// Every refusal lists the flags its message names, in the order it names them: what
/// injection once found by reading the message's words.
#[test]
fn refusals_name_their_flags() {
    let named = |message: &str| {
        let mut flags: Vec<String> = Vec::new();
        for word in message.split(|c: char| c.is_whitespace() || c == '(' || c == ')') {
            let flag = word.trim_end_matches([':', ',', ';', '.']);
            if flag.starts_with("--") && !flags.iter().any(|f| f == flag) {
                flags.push(flag.to_owned());
            }
        }
        flags
    };
    let cases: &[&[&str]] = &[
        &["--drain-min=10s", "--drain-max=5s"],
        &["--quiet=3m"],
        &["--quiet-fallback=3m"],
        &["--drain-min=0", "--quiet=0", "--drain-max=0"],
        &["--quiet=500ms"],
        &["--quiet-fallback=500ms"],
        &["--idle-timeout=0"],
        &["--upstream-body-timeout=0"],
        &["--upstream-health=/grpc.health.v1.Health/Check"],
        &["--events"],
        &["--events", "--pod-name=p"],
        &["--proxy-protocol=strip"],
        &["--mode=tcp", "--health-path=/healthz"],
        &["--mode=tcp", "--tls=self-signed"],
        &["--mode=tcp", "--tls-cert=/c", "--tls-key=/k"],
        &["--mode=tcp", "--tcp-health-check-within=0"],
        &["--listen=127.0.0.1:9000", "--admin=127.0.0.1:9000"],
        &["--upstream=127.0.0.1:0"],
        &["--upstream=127.0.0.1:8080"],
        &["--upstream=127.0.0.1:9901"],
        &["--drain-token=short"],
        &["--upstream-protocol=spdy"],
        &["--drain-record="],
    ];
    for args in cases {
        let e = ProxyArgs::parse_and_validate(args.iter().copied()).unwrap_err();
        assert_eq!(e.flags, named(&e.message), "{args:?}: {e}");
        assert_eq!(e.to_string(), e.message);
    }
}

#[test]
fn tcp_mode_has_nlb_sized_defaults() {
    let p = proxy(&["--mode", "tcp"]).unwrap();
    assert_eq!(p.mode, Mode::Tcp);
    assert_eq!(p.drain_max, Duration::from_secs(300));
    assert_eq!(p.quiet_fallback, Duration::from_secs(65));
    assert!(
        p.idle_timeout > Duration::from_secs(350),
        "must outlast the NLB's idle timeout"
    );
    assert_eq!(p.proxy_protocol, ProxyProtocol::Off);
    assert_eq!(p.tcp_health_check_within, Duration::from_secs(1));
    // Explicit values still win.
    let p = proxy(&["--mode=tcp", "--drain-max=200s", "--idle-timeout=400s"]).unwrap();
    assert_eq!(p.drain_max, Duration::from_secs(200));
    assert_eq!(p.idle_timeout, Duration::from_secs(400));
    // The injector's check sees the same defaults.
    let p = ProxyArgs::parse_and_validate(["--mode=tcp"]).unwrap();
    assert_eq!(p.drain_max, Duration::from_secs(300));
    // HTTP defaults unchanged.
    let p = proxy(&[]).unwrap();
    assert_eq!(
        (p.mode, p.drain_max),
        (Mode::Http, Duration::from_secs(120))
    );
}

#[test]
fn tcp_mode_flags_are_checked() {
    let e = proxy(&["--proxy-protocol", "strip"]).unwrap_err();
    assert!(e.contains("--proxy-protocol needs --mode tcp"), "{e}");
    let e = proxy(&["--mode", "tcp", "--health-path", "/healthz"]).unwrap_err();
    assert!(e.contains("--health-path is for --mode http"), "{e}");
    assert!(proxy(&["--mode", "udp"]).is_err());
    assert!(proxy(&["--mode", "tcp", "--proxy-protocol", "v1"]).is_err());
    let e = proxy(&["--mode", "tcp", "--tcp-health-check-within", "0"]).unwrap_err();
    assert!(e.contains("greater than 0"), "{e}");
    let p = proxy(&["--mode", "tcp", "--proxy-protocol", "pass"]).unwrap();
    assert_eq!(p.proxy_protocol, ProxyProtocol::Pass);
}

#[test]
fn fail_health_while_draining_is_a_tcp_mode_opt_in() {
    assert!(
        !proxy(&["--mode", "tcp"])
            .unwrap()
            .fail_health_while_draining
    );
    let p = proxy(&["--mode", "tcp", "--fail-health-while-draining"]).unwrap();
    assert!(p.fail_health_while_draining);
    // In http mode the health path already fails while draining: refused, in one line.
    let e = proxy(&["--fail-health-while-draining"]).unwrap_err();
    assert_eq!(
        e,
        "--fail-health-while-draining needs --mode tcp: in http mode the load balancer's \
         health path (--health-path) already fails while draining"
    );
}

#[test]
fn drain_client_flags() {
    let cli =
        Cli::try_parse_from(["lameduck", "drain", "--no-wait", "--admin", "127.0.0.1:1"]).unwrap();
    let Command::Drain(d) = cli.command else {
        unreachable!()
    };
    assert!(d.no_wait);
    assert_eq!(d.admin.to_string(), "127.0.0.1:1");
}
