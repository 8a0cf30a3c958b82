//! The pod: its containers, and the kubelet's termination sequence.
//!
//! A [`Container`] is a "process": one OS thread running its own single-threaded tokio
//! runtime, like the `lameduck` binary's default `--threads 1`. Its exit drops that
//! runtime, and with it the process's listeners and connections, so the ports really close
//! (connection refused afterwards) and requests being answered see EOF, as when the kernel
//! reaps a process. SIGTERM reaches a process that handles it (lameduck) as a termination
//! request on a channel; one that does not (the naive app) exits at once with 143.
//! SIGKILL always ends it at once with 137.
//!
//! [`Pod::terminate`] is the kubelet's side, after `kuberuntime_container.go` and
//! `kuberuntime_termination_order.go`: see the field notes in its doc.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use lameduck::cli::{Cli, Command};
use lameduck::sidecar::Bound;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{EventKind, Mode, Recorder};

/// The kubelet's floor between SIGTERM and SIGKILL (`minimumGracePeriodInSeconds`).
const MIN_GRACE: Duration = Duration::from_secs(2);

/// How a container process ended.
#[derive(Clone, Copy, Debug)]
pub struct Exit {
    pub at: Instant,
    pub code: i32,
}

/// One container's process.
pub struct Container {
    name: &'static str,
    /// SIGTERM for a process that handles it; `None`: SIGTERM's default action (exit).
    term: Option<mpsc::UnboundedSender<&'static str>>,
    kill: Mutex<Option<oneshot::Sender<i32>>>,
    exited: watch::Receiver<Option<Exit>>,
}

// === impl Container ===

impl Container {
    /// Starts a process running `main`. With `handles_sigterm`, `main` gets the channel its
    /// SIGTERMs arrive on; otherwise SIGTERM ends it at once.
    pub fn spawn<F, Fut>(name: &'static str, handles_sigterm: bool, main: F) -> Container
    where
        F: FnOnce(Option<mpsc::UnboundedReceiver<&'static str>>) -> Fut + Send + 'static,
        Fut: Future<Output = i32>,
    {
        let (term, term_rx) = if handles_sigterm {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let (kill, kill_rx) = oneshot::channel::<i32>();
        let (exited_tx, exited) = watch::channel(None);
        std::thread::Builder::new()
            .name(format!("container-{name}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime starts");
                let code = rt.block_on(async move {
                    tokio::select! {
                        biased;
                        // A dropped sender (the simulation gave up) is a SIGKILL too.
                        killed = kill_rx => killed.unwrap_or(137),
                        code = main(term_rx) => code,
                    }
                });
                // The process is gone: every task, listener and connection with it.
                drop(rt);
                let _ = exited_tx.send(Some(Exit {
                    at: Instant::now(),
                    code,
                }));
            })
            .expect("a container thread starts");
        Container {
            name,
            term,
            kill: Mutex::new(Some(kill)),
            exited,
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        match &self.term {
            Some(tx) => {
                let _ = tx.send("SIGTERM");
            }
            None => self.end(143),
        }
    }

    /// Sends SIGKILL.
    pub fn sigkill(&self) {
        self.end(137);
    }

    fn end(&self, code: i32) {
        if let Some(kill) = self.kill.lock().expect("never poisoned").take() {
            let _ = kill.send(code);
        }
    }

    pub fn has_exited(&self) -> bool {
        self.exited.borrow().is_some()
    }

    /// Resolves once the process has exited and its sockets are closed.
    pub async fn exited(&self) -> Exit {
        let mut rx = self.exited.clone();
        let exit = *rx
            .wait_for(Option::is_some)
            .await
            .expect("a container thread reports its exit before it ends");
        exit.expect("waited for Some")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.sigkill();
    }
}

// === the lameduck container ===

/// The lameduck sidecar, in-process from the library: `lameduck proxy --listen
/// 127.0.0.1:0 --admin 127.0.0.1:0 --upstream APP` followed by `extra_args`.
pub struct Sidecar {
    pub container: Container,
    pub traffic: SocketAddr,
    pub admin: SocketAddr,
}

pub async fn start_sidecar(app: SocketAddr, extra_args: &[String]) -> Result<Sidecar, String> {
    let app = app.to_string();
    let mut argv: Vec<&str> = vec![
        "lameduck",
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--upstream",
        &app,
    ];
    argv.extend(extra_args.iter().map(String::as_str));
    let cli = Cli::try_parse_from(&argv).map_err(|e| {
        let rendered = e.render().to_string();
        format!(
            "lameduck proxy {}: {}",
            extra_args.join(" "),
            rendered.lines().next().unwrap_or("invalid arguments")
        )
    })?;
    let Command::Proxy(args) = cli.command else {
        unreachable!("argv starts with `lameduck proxy`")
    };
    args.validate().map_err(|e| e.to_string())?;
    let (addr_tx, addr_rx) = oneshot::channel();
    let container = Container::spawn("lameduck", true, move |term| async move {
        let bound = match Bound::bind(args).await {
            Ok(b) => b,
            Err(e) => {
                let _ = addr_tx.send(Err(e.to_string()));
                return 2;
            }
        };
        let _ = addr_tx.send(Ok((bound.traffic_addr(), bound.admin_addr())));
        let term = term.expect("lameduck handles SIGTERM");
        i32::from(bound.run(term).await)
    });
    let (traffic, admin) = addr_rx
        .await
        .map_err(|_| "the lameduck container died while starting".to_string())??;
    Ok(Sidecar {
        container,
        traffic,
        admin,
    })
}

// === the kubelet ===

/// A pod of the app and, depending on the mode, lameduck.
pub struct Pod {
    pub mode: Mode,
    pub app: Container,
    pub sidecar: Option<Sidecar>,
}

impl Pod {
    /// Where the load balancer sends traffic and health checks.
    pub fn target(&self, app: SocketAddr) -> SocketAddr {
        self.sidecar.as_ref().map_or(app, |s| s.traffic)
    }

    /// Waits until the pod is Ready, as the endpoints controller would before the load
    /// balancer registers it: lameduck's `/readyz` answers 200 (it checks the app), or, for
    /// the app alone, its port accepts.
    pub async fn ready(&self, app: SocketAddr, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let ok = match &self.sidecar {
                Some(s) => matches!(
                    http_get(s.admin, "/readyz", "kube-probe/1.33").await,
                    Ok((StatusCode::OK, _))
                ),
                None => tokio::net::TcpStream::connect(app).await.is_ok(),
            };
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("the pod was not ready within {within:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The kubelet deletes the pod now (t0), with grace period `grace`:
    ///
    /// - the app container runs its preStop hook, `httpGet` on lameduck's admin `/drain`
    ///   (with lameduck; the app alone has none). The hook has no HTTP timeout, only the
    ///   grace period; any HTTP answer or a transport error ends it. Then SIGTERM, and
    ///   SIGKILL at the end of the grace period, but never less than 2 s after SIGTERM;
    /// - a regular sidecar is a container like any other: SIGTERM at t0, in parallel;
    /// - a native sidecar (an init container with `restartPolicy: Always`) gets SIGTERM only
    ///   once every main container has exited, and SIGKILL at the end of what is left.
    ///
    /// Returns once every container has exited.
    pub async fn terminate(&self, grace: Duration, rec: &Recorder) {
        let deadline = Instant::now() + grace;
        let hook = self.sidecar.as_ref().map(|s| s.admin);
        match (self.mode, &self.sidecar) {
            (Mode::Regular, Some(s)) => {
                tokio::join!(
                    stop(&self.app, hook, deadline, rec),
                    stop(&s.container, None, deadline, rec)
                );
            }
            (Mode::Native, Some(s)) => {
                stop(&self.app, hook, deadline, rec).await;
                stop(&s.container, None, deadline, rec).await;
            }
            _ => stop(&self.app, hook, deadline, rec).await,
        }
    }
}

/// Stops one container: preStop (an `httpGet /drain` on `hook`), SIGTERM, then SIGKILL if
/// it is still running at `deadline` (or 2 s after SIGTERM, if that is later).
async fn stop(c: &Container, hook: Option<SocketAddr>, deadline: Instant, rec: &Recorder) {
    if let Some(admin) = hook {
        rec.event(EventKind::PreStop(c.name()));
        let answer =
            tokio::time::timeout_at(deadline, http_get(admin, "/drain", "kube-lifecycle/1.33"))
                .await;
        rec.event(EventKind::PreStopDone(
            c.name(),
            match answer {
                Ok(Ok((status, body))) => Ok(format!("{} {}", status.as_u16(), body.trim())),
                Ok(Err(e)) => Err(format!("FailedPreStopHook: {e}")),
                Err(_) => Err("abandoned at the end of the grace period".into()),
            },
        ));
    }
    if c.has_exited() {
        // It ended by itself: nothing to signal.
    } else {
        rec.event(EventKind::Sigterm(c.name()));
        c.sigterm();
    }
    let kill_at = deadline.max(Instant::now() + MIN_GRACE);
    let exit = tokio::select! {
        exit = c.exited() => exit,
        _ = tokio::time::sleep_until(kill_at) => {
            rec.event(EventKind::Sigkill(c.name()));
            c.sigkill();
            c.exited().await
        }
    };
    rec.event_at(exit.at, EventKind::Exited(c.name(), exit.code));
}

/// A plain HTTP/1.1 GET on a new connection, like the kubelet's probes and hooks (no HTTP
/// timeout of its own). Returns the status and body.
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    user_agent: &str,
) -> Result<(StatusCode, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, addr.to_string())
        .header(header::USER_AGENT, user_agent)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Starts the pod's containers for `mode` and waits until it is Ready.
pub async fn start(
    mode: Mode,
    app: super::app::AppConfig,
    proxy_args: &[String],
) -> Result<(Arc<Pod>, SocketAddr), String> {
    let (app_container, app_addr) = super::app::start(app).await?;
    let sidecar = match mode {
        Mode::AppAlone => None,
        Mode::Regular | Mode::Native => Some(start_sidecar(app_addr, proxy_args).await?),
    };
    let pod = Pod {
        mode,
        app: app_container,
        sidecar,
    };
    pod.ready(app_addr, Duration::from_secs(10)).await?;
    let target = pod.target(app_addr);
    Ok((Arc::new(pod), target))
}
