//! SIGTERM and SIGINT, as a stream the sidecar turns into lifecycle triggers: the first
//! starts draining exactly like `/drain`, a second cuts the drain short.

use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};

/// Registered termination signals.
pub struct Signals(signal_hook_tokio::Signals);

impl Signals {
    /// Registers the handlers. From here on SIGTERM/SIGINT no longer kill the process.
    pub fn new() -> std::io::Result<Signals> {
        signal_hook_tokio::Signals::new([SIGTERM, SIGINT]).map(Signals)
    }

    /// The next signal's name.
    pub async fn recv(&mut self) -> &'static str {
        match self.0.next().await {
            Some(SIGTERM) => "SIGTERM",
            Some(SIGINT) => "SIGINT",
            Some(_) => "signal",
            // The stream only ends when its handle is closed, which this type never does.
            None => std::future::pending().await,
        }
    }
}
