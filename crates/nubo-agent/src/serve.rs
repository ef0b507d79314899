//! Serving the local API so that abuse cannot starve it: every connection must send its
//! request head within [`HEADER_TIMEOUT`], at most [`CONNECTIONS_MAX`] are open at once, and
//! when that many are, the oldest is closed to make room (a flood of connections that never
//! finish their headers then only ever displaces itself), so a real request always gets in.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How long a connection may take to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections open at once.
pub const CONNECTIONS_MAX: usize = 512;
/// How long a connection may stay open in all (a follow of logs or events ends then; the
/// CLI does not follow longer than a day without asking again).
const CONNECTION_LIFETIME_MAX: Duration = Duration::from_secs(24 * 3600);

/// Open connections, oldest first, each with the means to close it.
#[derive(Default)]
struct Open {
    next: u64,
    closers: BTreeMap<u64, oneshot::Sender<()>>,
}

/// Serves `app` on `listener` until the listener fails.
pub async fn serve(listener: TcpListener, app: Router) {
    let open: Arc<Mutex<Open>> = Arc::default();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, say: wait a moment instead of spinning.
                tracing::warn!(%error, "cannot accept an API connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (close, closed) = oneshot::channel();
        let id = {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            if open.closers.len() >= CONNECTIONS_MAX
                && let Some((_, oldest)) = open.closers.pop_first()
            {
                let _ = oldest.send(());
            }
            open.next += 1;
            let id = open.next;
            open.closers.insert(id, close);
            id
        };
        let service = TowerToHyperService::new(app.clone());
        let open = open.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = closed => {}
                _ = tokio::time::sleep(CONNECTION_LIFETIME_MAX) => {}
            }
            open.lock()
                .unwrap_or_else(|e| e.into_inner())
                .closers
                .remove(&id);
        });
    }
}
