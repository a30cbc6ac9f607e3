//! The HTTP server loop: hyper with the limits a public-facing service needs, which
//! `axum::serve` does not set: a time limit on reading request headers (a client that trickles
//! bytes cannot hold a connection), a cap on open connections, and graceful shutdown that lets
//! in-flight requests finish.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Connection-level limits of the HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Open connections at most (`OPENFHIR_MAX_CONNECTIONS`); more are closed at once.
    pub max_connections: usize,
    /// Time to receive a request's headers (`OPENFHIR_HEADER_TIMEOUT_SECS`).
    pub header_timeout: Duration,
    /// Time in-flight requests get to finish at shutdown.
    pub drain: Duration,
}

/// HTTP front counters of one node, for `/metrics`.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub refused: AtomicU64,
    /// Requests answered 503 at once because `max_concurrent_requests` were running.
    pub shed: AtomicU64,
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting and waits (at
/// most `limits.drain`) for open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut refusing = false;
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => r,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: keep serving what is open, do not spin.
                tracing::warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            if !refusing {
                refusing = true;
                tracing::warn!(
                    max = limits.max_connections,
                    "OPENFHIR_MAX_CONNECTIONS reached; closing new connections until some end"
                );
            }
            continue;
        };
        refusing = false;
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let activity = super::conn::Activity::new();
        let svc = {
            let (app, activity) = (app.clone(), activity.clone());
            tower::service_fn(move |req: Request<Incoming>| {
                // In flight from here until the router has answered: never idle meanwhile.
                let guard = activity.request();
                let answer = app.clone().oneshot(req.map(Body::new));
                async move {
                    let r = answer.await;
                    drop(guard);
                    r
                }
            })
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        builder.http2().timer(TokioTimer::new());
        let io = TokioIo::new(super::conn::Watched::new(stream, activity.clone()));
        let conn = builder
            .serve_connection_with_upgrades(io, TowerToHyperService::new(svc))
            .into_owned();
        let conn = graceful.watch(conn);
        let idle_limit = limits.header_timeout;
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            loop {
                // Re-checked at least once per limit, so the end of a request re-arms it.
                let deadline = activity
                    .idle_deadline(idle_limit)
                    .unwrap_or_else(|| tokio::time::Instant::now() + idle_limit);
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(%remote, error = %e, "HTTP connection ended with an error");
                        }
                        break;
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        let idle = activity
                            .idle_deadline(idle_limit)
                            .is_some_and(|d| d <= tokio::time::Instant::now());
                        if idle {
                            // Nothing read or written for the header timeout and no request
                            // running: a silent or stalled client. Dropping the connection
                            // closes it.
                            tracing::debug!(%remote, secs = idle_limit.as_secs(), "closing an idle HTTP connection");
                            break;
                        }
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            secs = limits.drain.as_secs(),
            "in-flight HTTP requests did not finish in time; closing them"
        );
    }
    Ok(())
}
