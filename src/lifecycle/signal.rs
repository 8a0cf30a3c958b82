//! SIGTERM and SIGINT, turned into termination requests for the sidecar: the first starts
//! draining exactly like `/drain`, a second cuts the drain short.
//!
//! The sidecar takes termination requests as a channel, not from the OS directly, so tests
//! and the rollout simulation can "send SIGTERM" to an in-process proxy.

use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use tokio::sync::mpsc;

/// Termination requests, by signal name.
pub type Terminations = mpsc::UnboundedReceiver<&'static str>;

/// Registers SIGTERM/SIGINT handlers and forwards each signal to the returned channel.
/// From here on these signals no longer kill the process. Call inside the runtime.
pub fn listen() -> std::io::Result<Terminations> {
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT])?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
            if tx.send(name).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
