//! Serving the router over HTTP/1.1 with a deadline wherever a peer can stall: headers (and
//! the idle time of a kept-alive connection before its next request), request bodies, response
//! writes to a reader that stopped reading, the number of connections, and the shutdown itself.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tower_http::timeout::RequestBodyTimeoutLayer;

/// The HTTP server's limits (`[http]` in the config file).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// A request's headers must arrive within this, counted from when the server starts
    /// waiting for them: a kept-alive connection idle this long is closed too.
    pub header_read_timeout_secs: u64,
    /// A request body that sends nothing for this long is cut off: the upload fails with 400
    /// and nothing of it is kept.
    pub body_idle_timeout_secs: u64,
    /// A response write that cannot proceed for this long (an event stream whose reader
    /// stopped reading) closes the connection.
    pub write_timeout_secs: u64,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// After a shutdown signal: the time runs get to stop and requests in flight to finish,
    /// in total, before the remaining connections are closed.
    pub shutdown_grace_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_read_timeout_secs: 30,
            body_idle_timeout_secs: 60,
            write_timeout_secs: 60,
            max_connections: 4096,
            shutdown_grace_secs: 20,
        }
    }
}

impl HttpConfig {
    /// Refuses settings that would cut every request or stream off at once (at load, before
    /// anything starts). A zero grace is allowed: shutdown then closes connections at once.
    pub fn validate(&self) -> Result<(), String> {
        for (name, value) in [
            ("header_read_timeout_secs", self.header_read_timeout_secs),
            ("body_idle_timeout_secs", self.body_idle_timeout_secs),
            ("write_timeout_secs", self.write_timeout_secs),
        ] {
            if value == 0 {
                return Err(format!("http.{name} must be at least 1"));
            }
        }
        if self.max_connections == 0 {
            return Err("http.max_connections must be at least 1".into());
        }
        Ok(())
    }
}

/// Serves `router` on `listener` until `signal` resolves; then stops accepting, runs
/// `before_close` (which ends the runs, so their event streams see `completion`) and lets
/// requests in flight finish, all within the shutdown grace, and closes what is left.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    cfg: &HttpConfig,
    signal: impl Future<Output = ()>,
    before_close: impl Future<Output = ()>,
) {
    let router = router.layer(RequestBodyTimeoutLayer::new(Duration::from_secs(cfg.body_idle_timeout_secs)));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(cfg.header_read_timeout_secs));
    let write_timeout = Duration::from_secs(cfg.write_timeout_secs);
    let slots = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    tokio::pin!(signal);
    loop {
        let permit = tokio::select! {
            () = &mut signal => break,
            p = slots.clone().acquire_owned() => p.expect("the connection semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of fds or a connection reset before accept: the listener is fine.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(WriteDeadline::new(stream, write_timeout));
        let conn = http.serve_connection(io, TowerToHyperService::new(router.clone()));
        let conn = graceful.watch(conn);
        conns.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
        // Reap finished connections so the set does not grow with every one ever served.
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let deadline = Instant::now() + Duration::from_secs(cfg.shutdown_grace_secs);
    tracing::info!(grace_secs = cfg.shutdown_grace_secs, "shutting down: stopping active runs");
    if tokio::time::timeout_at(deadline, before_close).await.is_err() {
        tracing::warn!("runs did not all stop within the shutdown grace");
    }
    let open = graceful.count();
    if tokio::time::timeout_at(deadline, graceful.shutdown()).await.is_err() {
        tracing::warn!(connections = conns.len(), "closing connections still busy after the shutdown grace");
    } else if open > 0 {
        tracing::info!(connections = open, "connections finished");
    }
    conns.shutdown().await;
}

/// A connection whose writes may not stall longer than its deadline: a peer that stops reading
/// (its receive window full) gets `TimedOut` and the connection is closed. Reads are left to
/// hyper's header timeout and the body idle timeout.
struct WriteDeadline<T> {
    io: T,
    timeout: Duration,
    /// Armed when a write could not proceed; cleared when one does.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(io: T, timeout: Duration) -> Self {
        Self { io, timeout, stalled: None }
    }

    /// Called when a write returned `Pending`: errors once the stall outlasted the timeout.
    fn check_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let timeout = self.timeout;
        let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading")))
    }

    fn track<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => match self.check_stall(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.track(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.track(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.track(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.track(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A writer into a pipe nobody reads: the write stalls once the pipe is full, and the
    /// deadline turns the stall into `TimedOut`; a reader that drains in time keeps it alive.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_write_times_out_and_a_slow_reader_does_not() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = WriteDeadline::new(a, Duration::from_secs(5));
        let chunk = vec![0u8; 512];
        // Positive control: with a reader draining, many pipe-fulls go through.
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut total = 0;
            while total < 64 * 1024 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                total += tokio::io::AsyncReadExt::read(&mut b, &mut buf).await.unwrap();
            }
            b
        });
        for _ in 0..128 {
            w.write_all(&chunk).await.expect("a reader that reads in time is never cut off");
        }
        let _b = drain.await.unwrap();
        // Nobody reads any more: the pipe fills, then the write times out.
        let t = Instant::now();
        let err = loop {
            if let Err(e) = w.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() >= Duration::from_secs(5), "{:?}", t.elapsed());
    }
}
