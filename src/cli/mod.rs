//! The command line: `lameduck proxy`, `lameduck drain`, `lameduck inject` and
//! `lameduck webhook`.
//!
//! Every flag also reads the environment variable `LAMEDUCK_<FLAG>` (`--drain-max` →
//! `LAMEDUCK_DRAIN_MAX`); the flag wins. Durations accept `500ms`, `10s`, `2m`. A bad value
//! exits 2 saying which flag and why (clap's whole message: the accepted values, the usage
//! line), before anything is served.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::lifecycle::cadence::Quiet;
use crate::lifecycle::drain::{DrainSettings, ReadinessWhileDraining, Unit};

mod values;
use crate::traffic::proxy_protocol::ProxyProtocol;
use crate::traffic::upstream::Protocol;
pub(crate) use values::fmt_dur;
pub use values::*;

#[derive(Parser, Debug)]
#[command(
    name = "lameduck",
    version,
    about = "A sidecar reverse proxy that keeps a terminating pod serving until its load \
             balancer has really stopped sending, and only then lets the app be stopped.",
    propagate_version = true,
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once at start
pub enum Command {
    /// Run the draining reverse proxy in front of the app (the sidecar).
    Proxy(ProxyArgs),
    /// Ask a running proxy to drain (for exec hooks and operators); exits 0 once drained.
    Drain(DrainArgs),
    /// Add the lameduck sidecar to every opted-in pod template in YAML manifests (GitOps).
    Inject(InjectArgs),
    /// Serve the mutating admission webhook that injects the sidecar at pod creation.
    Webhook(WebhookArgs),
}

/// `lameduck proxy`.
#[derive(Args, Debug, Clone)]
#[command(after_long_help = GRACE_HELP)]
pub struct ProxyArgs {
    /// Traffic port: the address the load balancer targets.
    #[arg(
        long,
        env = "LAMEDUCK_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:8080",
        help_heading = "Ports"
    )]
    pub listen: SocketAddr,

    /// The app, as host:port (resolved once at start). Not the proxy's own --listen or
    /// --admin; a request that loops back through it anyway is answered 508.
    #[arg(long, env = "LAMEDUCK_UPSTREAM", value_name = "ADDR", default_value = "127.0.0.1:3000",
          value_parser = parse_upstream, help_heading = "Ports")]
    pub upstream: SocketAddr,

    /// Admin port: /livez /readyz /drain /status /metrics. Must be reachable on the pod IP:
    /// the kubelet's preStop httpGet goes there, not to loopback.
    #[arg(
        long,
        env = "LAMEDUCK_ADMIN",
        value_name = "ADDR",
        default_value = "0.0.0.0:9901",
        help_heading = "Ports"
    )]
    pub admin: SocketAddr,

    /// Protocol spoken to the app: http1 (keep-alive pool) or h2c (HTTP/2 prior knowledge,
    /// for gRPC apps).
    #[arg(
        long,
        env = "LAMEDUCK_UPSTREAM_PROTOCOL",
        value_enum,
        default_value = "http1",
        help_heading = "Ports"
    )]
    pub upstream_protocol: Protocol,

    /// TLS on the traffic port without certificate files: `self-signed` generates a
    /// certificate at start (for an ALB HTTPS target group: the ALB does not verify its
    /// targets' certificates). For a certificate of your own, give --tls-cert and
    /// --tls-key instead. ALPN offers h2 and http/1.1; without TLS the port speaks HTTP/1.1
    /// and h2c.
    #[arg(long, env = "LAMEDUCK_TLS", value_enum, value_name = "self-signed",
          conflicts_with_all = ["tls_cert", "tls_key"], help_heading = "TLS")]
    pub tls: Option<TlsSource>,

    /// TLS on the traffic port with this PEM certificate chain (with --tls-key); re-read
    /// when it changes (cert-manager rotates the mounted Secret), new handshakes use the new
    /// pair, an invalid one keeps the old.
    #[arg(
        long,
        env = "LAMEDUCK_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key",
        help_heading = "TLS"
    )]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The PEM private key matching --tls-cert.
    #[arg(
        long,
        env = "LAMEDUCK_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert",
        help_heading = "TLS"
    )]
    pub tls_key: Option<std::path::PathBuf>,

    /// How often to check --tls-cert and --tls-key for changes.
    #[arg(long, env = "LAMEDUCK_TLS_RELOAD_INTERVAL", value_name = "DUR", default_value = "5s",
          value_parser = parse_duration, allow_hyphen_values = true, help_heading = "TLS")]
    pub tls_reload_interval: Duration,

    /// Keep serving at least this long once draining starts, whatever the traffic: the load
    /// balancer may not have noticed the pod is terminating yet.
    #[arg(long, env = "LAMEDUCK_DRAIN_MIN", value_name = "DUR", default_value = "5s",
          value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Drain")]
    pub drain_min: Duration,

    /// Draining may end once no request (health checks included) has started on the traffic
    /// port for this long: while the target is registered the load balancer's health checks
    /// keep arriving, so silence means deregistered. `auto` learns the window from the
    /// health checks seen while serving (each source's interval, x1.5 with several sources,
    /// x2 with one, + 250ms); a fixed DUR must exceed the health-check interval (ALB
    /// default 15s). At least 1s.
    #[arg(long, env = "LAMEDUCK_QUIET", value_name = "auto|DUR", default_value = "auto",
          value_parser = parse_quiet, allow_hyphen_values = true, help_heading = "Drain")]
    pub quiet: QuietArg,

    /// With --quiet auto: the window used until an interval has been learned (a pod that
    /// has just started). 30s covers the ALB's default 15s interval and one missed check;
    /// with --mode tcp the default is 65s, for the NLB target group's default 30s interval.
    /// At least 1s.
    #[arg(long, env = "LAMEDUCK_QUIET_FALLBACK", value_name = "DUR", default_value = "30s",
          default_value_if("mode", "tcp", "65s"),
          value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Drain")]
    pub quiet_fallback: Duration,

    /// User-Agent prefixes that mark a request as a load-balancer health check (besides
    /// requests to --health-path), comma-separated. Checks are learned from for --quiet
    /// auto and counted apart from application requests. Default: AWS's ELB health checks
    /// and Google Cloud's (GKE container-native load balancing).
    #[arg(
        long,
        env = "LAMEDUCK_HEALTH_CHECK_AGENTS",
        value_name = "LIST",
        default_value = "ELB-HealthChecker,GoogleHC",
        value_delimiter = ',',
        help_heading = "Drain"
    )]
    pub health_check_agents: Vec<String>,

    /// Hard cap on draining. Covers the AWS Load Balancer Controller's deregistration lag
    /// (70s seen in production). drain-max plus the app's own shutdown time must fit inside
    /// the pod's terminationGracePeriodSeconds. With --mode tcp the default is 300s: an NLB
    /// keeps opening connections for about 2 min after deregistration (up to 180s seen),
    /// after the controller's own lag.
    #[arg(long, env = "LAMEDUCK_DRAIN_MAX", value_name = "DUR", default_value = "120s",
          default_value_if("mode", "tcp", "300s"),
          value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Drain")]
    pub drain_max: Duration,

    /// While draining, answer requests to PATH on the traffic port with 503 (gRPC requests:
    /// `grpc-status: 14`), so the load balancer marks the target unhealthy sooner; while
    /// serving they go to the app. May be given more than once (env: comma-separated).
    /// /AWS.ALB/healthcheck, the ALB's default gRPC health check, is always one.
    #[arg(long, env = "LAMEDUCK_HEALTH_PATH", value_name = "PATH", value_parser = parse_path,
          value_delimiter = ',', help_heading = "Drain")]
    pub health_path: Vec<String>,

    /// After the drain, how long upgraded tunnels (WebSockets) still open may stay before
    /// the app is released without them (within drain-max). Tunnels never hold the quiet
    /// decision; they close at exit. 10s: time for a tunnel that is finishing to finish.
    #[arg(long, env = "LAMEDUCK_TUNNEL_GRACE", value_name = "DUR", default_value = "10s",
          value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Drain")]
    pub tunnel_grace: Duration,

    /// While draining, leave persistent connections alone (the behaviour before 0.2). By
    /// default, HTTP/1 responses carry `Connection: close` and each HTTP/2 connection gets
    /// one graceful GOAWAY once it has been open half the quiet window, at a moment its
    /// client has nothing queued, so clients that hold one connection (gRPC, keep-alive
    /// clients inside the cluster) move to other pods; new connections are still accepted
    /// and served, and an idle connection is never closed for it.
    #[arg(
        long,
        env = "LAMEDUCK_KEEP_ALIVE_WHILE_DRAINING",
        help_heading = "Drain"
    )]
    pub keep_alive_while_draining: bool,

    /// What /readyz answers while draining: `fail` (503 at once: ALB/NLB IP targets, and
    /// the only way out where nothing deletes the pod), `keep` (200 until the drain is over:
    /// kube-proxy with externalTrafficPolicy Local, Cilium, Envoy Gateway and other
    /// consumers that keep routing to a serving terminating endpoint), or DUR (200 for DUR
    /// after the drain starts, then 503). The load balancer's health path (--health-path)
    /// fails at once whatever this says.
    #[arg(long, env = "LAMEDUCK_READINESS_WHILE_DRAINING", value_name = "fail|keep|DUR",
          default_value = "fail", value_parser = parse_readiness, allow_hyphen_values = true,
          help_heading = "Drain")]
    pub readiness_while_draining: ReadinessWhileDraining,

    /// Readiness also needs GET PATH on the app to answer 2xx (default: a TCP connect).
    #[arg(long, env = "LAMEDUCK_UPSTREAM_HEALTH", value_name = "PATH", value_parser = parse_path,
          help_heading = "Drain")]
    pub upstream_health: Option<String>,

    /// When set, /drain requires the header X-Lameduck-Token with this value (403
    /// otherwise): the admin port is reachable from the cluster network. 16 to 256
    /// characters of A-Z a-z 0-9 . _ ~ + / = - (an empty LAMEDUCK_DRAIN_TOKEN is refused:
    /// unset it for no token).
    #[arg(
        long,
        env = "LAMEDUCK_DRAIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        help_heading = "Drain"
    )]
    pub drain_token: Option<String>,

    /// Record a drain in this file (written atomically as the drain starts), so that a
    /// proxy restarted in the middle of it (a crash during a drain asked on the admin port;
    /// during termination, on a kubelet that restarts native sidecars then) resumes the drain
    /// instead of starting ready: /readyz fails from its first answer (as
    /// --readiness-while-draining says), the drain's clock counts from the recorded start
    /// (keeping at least two quiet windows before drain-max), /drain answers once traffic
    /// stops. An unreadable record counts as a drain in progress. Removed when
    /// a drain heals (exit 3). Put it on an emptyDir (injection: /var/run/lameduck/draining).
    /// Default: none.
    #[arg(long, env = "LAMEDUCK_DRAIN_RECORD", value_name = "PATH", value_parser = parse_record_path,
          help_heading = "Drain")]
    pub drain_record: Option<std::path::PathBuf>,

    /// Give up connecting to the app after this long and answer 504. The app is on loopback
    /// in the same pod: a connect that has not completed in 1s will not.
    #[arg(long, env = "LAMEDUCK_UPSTREAM_CONNECT_TIMEOUT", value_name = "DUR", default_value = "1s",
          value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Timeouts")]
    pub upstream_connect_timeout: Duration,

    /// Never reuse an app connection idle longer than this. Below every common app
    /// keep-alive timeout (gunicorn 2s, Node.js and uvicorn 5s), so lameduck never sends on
    /// a connection the app is closing; a new loopback connection costs ~100µs.
    #[arg(long, env = "LAMEDUCK_UPSTREAM_IDLE_TIMEOUT", value_name = "DUR", default_value = "1s",
          value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Timeouts")]
    pub upstream_idle_timeout: Duration,

    /// Close a downstream keep-alive connection idle this long. Above the ALB's default 60s
    /// idle timeout, so the load balancer always closes first (a close racing its reuse of
    /// the connection is a 502). Raise it above a raised ALB idle timeout. With --mode tcp:
    /// a connection with no byte either way for this long is closed; the default is then
    /// 360s, above the NLB's fixed 350s TCP idle timeout.
    #[arg(long, env = "LAMEDUCK_IDLE_TIMEOUT", value_name = "DUR", default_value = "75s",
          default_value_if("mode", "tcp", "360s"),
          value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Timeouts")]
    pub idle_timeout: Duration,

    /// A new connection's first request head must be complete within this long of the
    /// accept (one that sends nothing is closed then too); on a kept-alive connection, within
    /// this long of the head's first byte, or the connection is closed (slowloris). Does not
    /// shorten the idle window between requests. The HTTP/2 preface counts as a head.
    #[arg(long, env = "LAMEDUCK_HEADER_READ_TIMEOUT", value_name = "DUR", default_value = "10s",
          value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Timeouts")]
    pub header_read_timeout: Duration,

    /// A request body must bring at least 1 KiB per this long until it ends, or the request
    /// is ended with 408 (a body trickled a byte at a time would hold the client's and the
    /// app's connections for ever). 60s: the ALB's default idle timeout, after which the
    /// ALB gives up on a silent client too.
    #[arg(long, env = "LAMEDUCK_REQUEST_BODY_TIMEOUT", value_name = "DUR", default_value = "60s",
          value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Timeouts")]
    pub request_body_timeout: Duration,

    /// The app must start its response (headers) within this long after the request was
    /// sent, or the client gets 504 naming the timeout and the app connection is closed.
    /// 60s: the ALB's default idle timeout, when the ALB itself answers 504; raise both
    /// together for slow endpoints or long polling.
    #[arg(long, env = "LAMEDUCK_UPSTREAM_RESPONSE_TIMEOUT", value_name = "DUR", default_value = "60s",
          value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Timeouts")]
    pub upstream_response_timeout: Duration,

    /// A response body from the app that sends nothing for this long is ended (the client
    /// sees the connection closed, or the h2 stream reset). 60s, like the ALB's idle
    /// timeout: a stream (SSE, gRPC) must send something at least this often.
    #[arg(long, env = "LAMEDUCK_UPSTREAM_BODY_TIMEOUT", value_name = "DUR", default_value = "60s",
          value_parser = parse_duration, allow_hyphen_values = true, help_heading = "Timeouts")]
    pub upstream_body_timeout: Duration,

    /// Downstream connections served at once; beyond it new connections are accepted and
    /// closed at once (counted in lameduck_connections_refused_total), so the process keeps
    /// file descriptors for the admin port and the app. 0 (default): derived from the file
    /// descriptor limit, which lameduck raises to its hard limit at start: (limit - 64) / 2,
    /// half kept for app connections.
    #[arg(
        long,
        env = "LAMEDUCK_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 0,
        allow_hyphen_values = true,
        help_heading = "Limits"
    )]
    pub max_connections: usize,

    /// Post one Kubernetes Event on this pod per drain (reason Drained or DrainCutShort, with
    /// the seconds, the requests served while draining and the quiet window's reason). Needs
    /// the pod's ServiceAccount token and `create` on `events` in its namespace; without
    /// access, says so once at start and carries on. Needs --pod-name and --pod-namespace.
    #[arg(long, env = "LAMEDUCK_EVENTS", help_heading = "Kubernetes")]
    pub events: bool,

    /// This pod's name, for --events (the downward API's metadata.name).
    #[arg(
        long,
        env = "LAMEDUCK_POD_NAME",
        value_name = "NAME",
        help_heading = "Kubernetes"
    )]
    pub pod_name: Option<String>,

    /// This pod's namespace, for --events (the downward API's metadata.namespace).
    #[arg(
        long,
        env = "LAMEDUCK_POD_NAMESPACE",
        value_name = "NS",
        help_heading = "Kubernetes"
    )]
    pub pod_namespace: Option<String>,

    /// This pod's uid, for --events (the downward API's metadata.uid; optional).
    #[arg(
        long,
        env = "LAMEDUCK_POD_UID",
        value_name = "UID",
        help_heading = "Kubernetes"
    )]
    pub pod_uid: Option<String>,

    /// Where the pod's ServiceAccount token and CA are mounted, for --events (the API server
    /// is KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT, which the kubelet sets).
    #[arg(long, env = "LAMEDUCK_SERVICE_ACCOUNT_DIR", value_name = "DIR",
          default_value = SERVICE_ACCOUNT_DIR, help_heading = "Kubernetes")]
    pub service_account_dir: std::path::PathBuf,

    /// Worker threads. 1 (default) runs everything on one thread, the cheapest for a sidecar
    /// with a fractional CPU limit; raise it only for a pod given several cores.
    #[arg(long, env = "LAMEDUCK_THREADS", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=256), allow_hyphen_values = true, help_heading = "Runtime")]
    pub threads: u16,

    /// Log format on stderr.
    #[arg(
        long,
        env = "LAMEDUCK_LOG_FORMAT",
        value_enum,
        default_value = "text",
        help_heading = "Runtime"
    )]
    pub log_format: LogFormat,

    /// Log level.
    #[arg(
        long,
        env = "LAMEDUCK_LOG_LEVEL",
        value_enum,
        default_value = "info",
        help_heading = "Runtime"
    )]
    pub log_level: LogLevel,

    /// What the traffic port speaks. http: the draining reverse proxy (ALB, HTTP/gRPC).
    /// tcp: a layer-4 forwarder for Network Load Balancers; quiet means no new connection,
    /// in flight means an open connection (see the README's TCP mode section).
    #[arg(
        long,
        env = "LAMEDUCK_MODE",
        value_enum,
        default_value = "http",
        help_heading = "TCP mode"
    )]
    pub mode: Mode,

    /// With --mode tcp: a PROXY protocol v2 header (the NLB target group's
    /// proxy_protocol_v2.enabled) starts every connection. strip: parse it and forward the
    /// payload only; pass: parse it and forward it to the app unchanged; off: none expected.
    /// A malformed header closes the connection. Its source address is what health-check
    /// tracking uses.
    #[arg(
        long,
        env = "LAMEDUCK_PROXY_PROTOCOL",
        value_enum,
        default_value = "off",
        help_heading = "TCP mode"
    )]
    pub proxy_protocol: ProxyProtocol,

    /// With --mode tcp: a connection that sends no byte (after any PROXY header) and closes
    /// within this long of being accepted is a load-balancer TCP health check: learned from
    /// per source for --quiet auto, counted apart from traffic. NLB checks close at once.
    #[arg(long, env = "LAMEDUCK_TCP_HEALTH_CHECK_WITHIN", value_name = "DUR", default_value = "1s",
          value_parser = parse_duration, allow_hyphen_values = true, help_heading = "TCP mode")]
    pub tcp_health_check_within: Duration,

    /// With --mode tcp: while draining, fail the load balancer's HTTP health checks (503):
    /// the admin port's /lb-health, and checks recognised on the traffic port (a GET or HEAD
    /// from --health-check-agents, answered by lameduck instead of the app). New connections
    /// are still accepted and open ones keep flowing. For an NLB target group that drains
    /// unhealthy targets (target_health_state.unhealthy.connection_termination.enabled=false,
    /// draining_interval_seconds >= drain-max): it stops opening connections sooner than
    /// after deregistration. WITHOUT those attributes the NLB resets every open connection
    /// of an unhealthy target. TCP health checks cannot be failed without refusing clients.
    /// Annotation: lameduck.io/fail-health-while-draining.
    #[arg(long, env = "LAMEDUCK_FAIL_HEALTH_WHILE_DRAINING", value_name = "BOOL",
          help_heading = "TCP mode", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub fail_health_while_draining: bool,
}

/// Where the traffic port's certificate comes from without files (`--tls`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TlsSource {
    /// Generated at start (ECDSA P-256, for localhost, 127.0.0.1, ::1 and the pod's name).
    SelfSigned,
}

/// What the traffic port speaks (`--mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The draining HTTP/1.1 and h2c reverse proxy.
    Http,
    /// The layer-4 TCP forwarder.
    Tcp,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::Tcp => "tcp",
        }
    }
}

const GRACE_HELP: &str = "\
Wiring it into a pod:
  The app container's preStop hook is an httpGet on the admin port, path /drain: the kubelet
  sends the app SIGTERM only after /drain answers, i.e. once traffic has stopped.
  Set terminationGracePeriodSeconds >= drain-max + the app's own shutdown time (lameduck
  inject uses drain-max + 30s). If the grace period runs out first, the kubelet abandons the
  hook and the app is signalled while traffic may still arrive.";

/// `lameduck proxy`'s flags refused: the message the binary prints (exit 2), and the flags
/// that message is about, in the order it names them. A caller that set the flags itself
/// (injection, from annotations) says where each came from by reading `flags`, never the
/// message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// The flags the message names (`--drain-max`), each once. Empty for clap's own parse
    /// errors, which quote their flag in the message.
    pub flags: Vec<&'static str>,
    pub message: String,
}

impl ConfigError {
    fn new(flags: &[&'static str], message: impl Into<String>) -> Self {
        ConfigError {
            flags: flags.to_vec(),
            message: message.into(),
        }
    }
}

impl ProxyArgs {
    /// Checks that the flags make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_drain()?;
        self.check_timeouts()?;
        self.check_features()?;
        self.check_addresses()?;
        self.check_drain_record()?;
        if let Some(token) = &self.drain_token {
            check_drain_token(token).map_err(|e| {
                ConfigError::new(
                    &["--drain-token"],
                    format!("--drain-token (or LAMEDUCK_DRAIN_TOKEN): {e}; unset it for no token"),
                )
            })?;
        }
        Ok(())
    }

    /// drain-min, the quiet window and drain-max fit together.
    fn check_drain(&self) -> Result<(), ConfigError> {
        if self.drain_min > self.drain_max {
            return Err(ConfigError::new(
                &["--drain-min", "--drain-max"],
                format!(
                    "--drain-min ({}) must not exceed --drain-max ({})",
                    fmt_dur(self.drain_min),
                    fmt_dur(self.drain_max)
                ),
            ));
        }
        let (flag, quiet) = match self.quiet {
            QuietArg::Fixed(d) => ("--quiet", d),
            QuietArg::Auto => ("--quiet-fallback", self.quiet_fallback),
        };
        if quiet > self.drain_max {
            return Err(ConfigError::new(
                &[flag, "--drain-max"],
                format!(
                    "{flag} ({}) must not exceed --drain-max ({}): every drain would end at \
                     the cap",
                    fmt_dur(quiet),
                    fmt_dur(self.drain_max)
                ),
            ));
        }
        if self.drain_max.is_zero() {
            return Err(ConfigError::new(
                &["--drain-max"],
                "--drain-max must be greater than 0",
            ));
        }
        for (flag, d) in [
            ("--quiet", self.quiet.fixed()),
            ("--quiet-fallback", Some(self.quiet_fallback)),
        ] {
            if let Some(d) = d.filter(|d| *d < MIN_QUIET) {
                return Err(ConfigError::new(
                    &[flag],
                    format!(
                        "{flag} ({}) must be at least {}: a shorter window ends a drain in the \
                         gap between two requests of one steady client",
                        fmt_dur(d),
                        fmt_dur(MIN_QUIET)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// No timeout is 0.
    fn check_timeouts(&self) -> Result<(), ConfigError> {
        for (flag, d) in [
            ("--upstream-connect-timeout", self.upstream_connect_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--header-read-timeout", self.header_read_timeout),
            ("--request-body-timeout", self.request_body_timeout),
            (
                "--upstream-response-timeout",
                self.upstream_response_timeout,
            ),
            ("--upstream-body-timeout", self.upstream_body_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::new(
                    &[flag],
                    format!("{flag} must be greater than 0"),
                ));
            }
        }
        Ok(())
    }

    /// Each feature has what it needs, and is for the mode it is given with.
    fn check_features(&self) -> Result<(), ConfigError> {
        if let Some(path) = &self.upstream_health {
            if path.starts_with(crate::traffic::upstream::GRPC_HEALTH_SERVICE)
                && self.upstream_protocol != Protocol::H2c
            {
                return Err(ConfigError::new(
                    &["--upstream-health", "--upstream-protocol"],
                    format!(
                        "--upstream-health {path} is the gRPC health service: it needs \
                         --upstream-protocol h2c"
                    ),
                ));
            }
        }
        if self.events && (self.pod_name.is_none() || self.pod_namespace.is_none()) {
            return Err(ConfigError::new(
                &["--events", "--pod-name", "--pod-namespace"],
                "--events needs --pod-name and --pod-namespace (LAMEDUCK_POD_NAME and \
                 LAMEDUCK_POD_NAMESPACE, from the downward API)",
            ));
        }
        if self.mode == Mode::Http && self.proxy_protocol != ProxyProtocol::Off {
            return Err(ConfigError::new(
                &["--proxy-protocol", "--mode"],
                "--proxy-protocol needs --mode tcp",
            ));
        }
        if self.mode == Mode::Http && self.fail_health_while_draining {
            return Err(ConfigError::new(
                &["--fail-health-while-draining", "--mode"],
                "--fail-health-while-draining needs --mode tcp: in http mode the load \
                 balancer's health path (--health-path) already fails while draining",
            ));
        }
        if self.mode == Mode::Tcp && !self.health_path.is_empty() {
            return Err(ConfigError::new(
                &["--health-path", "--mode"],
                "--health-path is for --mode http: in tcp mode the load balancer's \
                        health checks keep passing while draining, unless the opt-in for target \
                        groups that drain unhealthy targets says otherwise (docs/tcp-mode.md)",
            ));
        }
        if self.mode == Mode::Tcp && self.tls_enabled() {
            let (given, flags): (_, &[_]) = match self.tls {
                Some(_) => ("--tls is", &["--tls", "--mode"]),
                None => (
                    "--tls-cert and --tls-key are",
                    &["--tls-cert", "--tls-key", "--mode"],
                ),
            };
            return Err(ConfigError::new(
                flags,
                format!(
                    "{given} for --mode http: in tcp mode TLS passes through to the app \
                     untouched"
                ),
            ));
        }
        if self.tcp_health_check_within.is_zero() {
            return Err(ConfigError::new(
                &["--tcp-health-check-within"],
                "--tcp-health-check-within must be greater than 0",
            ));
        }
        Ok(())
    }

    /// `--drain-record` names a file. Whether its directory exists is the running proxy's
    /// business (a failed write is logged and counted, never fatal): injection validates
    /// these arguments where the pod's volume does not exist.
    fn check_drain_record(&self) -> Result<(), ConfigError> {
        let Some(path) = &self.drain_record else {
            return Ok(());
        };
        let text = path.to_string_lossy();
        if text.trim().is_empty() || text.ends_with('/') || path.file_name().is_none() {
            return Err(ConfigError::new(
                &["--drain-record"],
                format!(
                    "--drain-record {text:?} must name a file, such as \
                     /var/run/lameduck/draining (on an emptyDir volume)"
                ),
            ));
        }
        Ok(())
    }

    /// The three addresses are distinct, and the upstream is not the proxy itself.
    fn check_addresses(&self) -> Result<(), ConfigError> {
        if self.listen == self.admin && self.listen.port() != 0 {
            return Err(ConfigError::new(
                &["--listen", "--admin"],
                format!(
                    "--listen and --admin are both {}: they must differ",
                    self.listen
                ),
            ));
        }
        if self.upstream.port() == 0 {
            return Err(ConfigError::new(
                &["--upstream"],
                format!(
                    "--upstream {} has port 0: the app must be given by its real port",
                    self.upstream
                ),
            ));
        }
        for (flag, own) in [("--listen", self.listen), ("--admin", self.admin)] {
            if reaches(self.upstream, own) {
                return Err(ConfigError::new(
                    &["--upstream", flag],
                    format!(
                        "--upstream {} is the proxy's own {flag} {own}: every request would \
                         loop back into the proxy",
                        self.upstream
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Parses `lameduck proxy` arguments (without the program and subcommand names) and
    /// validates them, ignoring the process environment: `lameduck inject` and the webhook
    /// check the arguments they give an injected sidecar this way, so the proxy's own
    /// parser and [`ProxyArgs::validate`] are the one source of truth.
    pub fn parse_and_validate<I, S>(args: I) -> Result<ProxyArgs, ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory as _, FromArgMatches as _};
        let cmd = Cli::command()
            .find_subcommand("proxy")
            .expect("the proxy subcommand exists")
            .clone()
            .no_binary_name(true)
            .mut_args(|a| a.env(None::<&str>));
        let matches = cmd.try_get_matches_from(args).map_err(|e| {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            ConfigError::new(&[], first.trim_start_matches("error: "))
        })?;
        let args = ProxyArgs::from_arg_matches(&matches)
            .map_err(|e| ConfigError::new(&[], e.to_string()))?;
        args.validate()?;
        Ok(args)
    }

    /// Whether the traffic port terminates TLS.
    pub fn tls_enabled(&self) -> bool {
        self.tls.is_some() || self.tls_cert.is_some()
    }

    pub fn settings(&self) -> DrainSettings {
        DrainSettings {
            min: self.drain_min,
            quiet: match self.quiet {
                QuietArg::Fixed(d) => Quiet::Fixed(d),
                QuietArg::Auto => Quiet::Auto {
                    fallback: self.quiet_fallback,
                },
            },
            max: self.drain_max,
            tunnel_grace: self.tunnel_grace,
            unit: match self.mode {
                Mode::Http => Unit::Request,
                Mode::Tcp => Unit::Connection,
            },
        }
    }
}

/// `lameduck drain`.
#[derive(Args, Debug, Clone)]
pub struct DrainArgs {
    /// The proxy's admin address.
    #[arg(long, env = "LAMEDUCK_ADMIN", value_name = "ADDR", default_value = "127.0.0.1:9901",
          value_parser = parse_upstream)]
    pub admin: SocketAddr,

    /// Return as soon as draining has started (202) instead of waiting until drained.
    #[arg(long, env = "LAMEDUCK_NO_WAIT")]
    pub no_wait: bool,

    /// The proxy's --drain-token, sent as X-Lameduck-Token.
    #[arg(
        long,
        env = "LAMEDUCK_DRAIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

/// The sidecar image when neither `--sidecar-image` nor `LAMEDUCK_SIDECAR_IMAGE` says
/// otherwise: this build's own version.
pub const DEFAULT_SIDECAR_IMAGE: &str =
    concat!("ghcr.io/lameduck/lameduck:", env!("CARGO_PKG_VERSION"));

/// The sidecar settings shared by `lameduck inject` and `lameduck webhook`.
#[derive(Args, Debug, Clone)]
pub struct SidecarArgs {
    /// Image of the injected lameduck container.
    #[arg(long, env = "LAMEDUCK_SIDECAR_IMAGE", value_name = "IMG",
          default_value = DEFAULT_SIDECAR_IMAGE)]
    pub sidecar_image: String,

    /// Inject a native sidecar (initContainers, restartPolicy: Always; Kubernetes >= 1.29)
    /// rather than a regular container. A pod's annotation lameduck.io/native-sidecar wins.
    #[arg(long, env = "LAMEDUCK_NATIVE_SIDECAR", value_name = "BOOL", default_value_t = true,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub native_sidecar: bool,

    /// A default for a per-pod annotation, used for every pod that does not set it, e.g.
    /// `--sidecar-default lameduck.io/cpu-request=50m` (cluster-wide sidecar resources or
    /// drain settings). May be given more than once (env: comma-separated). Unknown keys are
    /// refused at start.
    #[arg(long = "sidecar-default", env = "LAMEDUCK_SIDECAR_DEFAULTS", value_name = "KEY=VALUE",
          value_delimiter = ',', value_parser = parse_key_value)]
    pub sidecar_defaults: Vec<(String, String)>,
}

/// `KEY=VALUE`.
fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!(
            "{s:?}: expected KEY=VALUE, e.g. lameduck.io/cpu-request=50m"
        )),
    }
}

/// `lameduck inject`.
#[derive(Args, Debug, Clone)]
pub struct InjectArgs {
    /// Manifests to read (multi-document YAML, `kind: List` too); `-` reads stdin.
    #[arg(
        short = 'f',
        long = "filename",
        env = "LAMEDUCK_FILENAME",
        value_name = "FILE",
        default_value = "-"
    )]
    pub filename: std::path::PathBuf,

    #[command(flatten)]
    pub sidecar: SidecarArgs,

    /// Inject into every pod template, not only those labelled lameduck.io/inject: "true"
    /// (a template labelled "false" is still skipped).
    #[arg(long, env = "LAMEDUCK_INJECT_ALL")]
    pub all: bool,
}

/// `lameduck webhook`.
#[derive(Args, Debug, Clone)]
pub struct WebhookArgs {
    /// HTTPS address the API server calls (POST /mutate; GET /healthz).
    #[arg(
        long,
        env = "LAMEDUCK_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:8443"
    )]
    pub listen: SocketAddr,

    /// PEM certificate chain; re-read when it changes (cert-manager rotates it).
    #[arg(long, env = "LAMEDUCK_TLS_CERT", value_name = "FILE")]
    pub tls_cert: std::path::PathBuf,

    /// PEM private key matching --tls-cert; re-read when it changes.
    #[arg(long, env = "LAMEDUCK_TLS_KEY", value_name = "FILE")]
    pub tls_key: std::path::PathBuf,

    /// How often to check the certificate files for changes.
    #[arg(long, env = "LAMEDUCK_TLS_RELOAD_INTERVAL", value_name = "DUR", default_value = "5s",
          value_parser = parse_duration)]
    pub tls_reload_interval: Duration,

    /// On SIGTERM, fail /healthz (readiness) and keep answering reviews this long before
    /// closing: the API server keeps calling an endpoint until it has seen the pod leave
    /// the Service. Must fit in the pod's terminationGracePeriodSeconds with the preStop.
    #[arg(long, env = "LAMEDUCK_DRAIN_TIME", value_name = "DUR", default_value = "10s",
          value_parser = parse_duration)]
    pub drain_time: Duration,

    #[command(flatten)]
    pub sidecar: SidecarArgs,

    /// Log format on stderr.
    #[arg(long, env = "LAMEDUCK_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log level.
    #[arg(long, env = "LAMEDUCK_LOG_LEVEL", value_enum, default_value = "info")]
    pub log_level: LogLevel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[cfg(test)]
mod tests;
