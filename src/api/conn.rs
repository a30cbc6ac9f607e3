//! What one HTTP connection is doing, for the limits hyper does not enforce by itself:
//!
//! * **Idle connections end.** hyper's header timeout starts only once hyper-util has seen enough
//!   bytes to tell HTTP/1 from HTTP/2, so a connection that sends nothing (or the first bytes of
//!   the HTTP/2 preface and then nothing) was held forever: a few thousand of them locked every
//!   client out. [`Activity`] records the last byte read or written and the requests in flight;
//!   the connection's task closes it when it has been idle for the header timeout.
//! * **hyper's own error answers are JSON too.** hyper answers a request it cannot parse
//!   (invalid bytes in the request line, a duplicate `Content-Length`, a NUL in a header, headers
//!   too large) itself, with an empty body, before the request reaches the router. [`Watched`]
//!   replaces that answer with the API's `{error, details}` body. Such an answer is recognised by
//!   what only hyper writes: a `4xx` head without `Content-Type` and with `Content-Length: 0`,
//!   written alone, after request bytes were read that never reached the router, with no request
//!   in flight (every 4xx of the router carries a JSON body).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The activity of one connection, shared by its IO, its service and its task.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last byte read or written.
    last_io_ms: AtomicU64,
    /// Requests the router is handling.
    in_flight: AtomicUsize,
    /// Bytes were read since the router was last handed a request.
    read_since_request: AtomicBool,
}

impl Activity {
    /// A new connection's activity: idle since now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            read_since_request: AtomicBool::new(false),
        })
    }

    fn touch(&self) {
        let ms = (Instant::now() - self.start).as_millis() as u64;
        self.last_io_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When the connection becomes idle for `limit`, unless something happens first: `None`
    /// while a request is in flight.
    pub fn idle_deadline(&self, limit: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed));
        Some(self.start + last + limit)
    }

    /// A request reached the router; the guard marks it done when dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.read_since_request.store(false, Ordering::Release);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

/// A request the router is handling (see [`Activity::request`]).
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

/// A connection's IO: records activity, and swaps hyper's empty-bodied automatic error answers
/// for JSON ones (see the module docs).
pub struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
    /// Bytes still to write in place of what hyper wrote.
    replacement: Option<(Vec<u8>, usize)>,
}

impl<T> Watched<T> {
    /// Wraps `inner`, recording into `activity`.
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Watched {
            inner,
            activity,
            replacement: None,
        }
    }
}

/// The JSON answer that replaces hyper's automatic one, if `buf` is one.
fn replacement_for(buf: &[u8]) -> Option<Vec<u8>> {
    if !(buf.starts_with(b"HTTP/1.1 4") || buf.starts_with(b"HTTP/1.0 4")) || buf.len() > 1024 {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?;
    // The head alone, nothing after it.
    let end = head.find("\r\n\r\n")?;
    if end + 4 != head.len() {
        return None;
    }
    let mut lines = head[..end].split("\r\n");
    let status_line = lines.next()?;
    let mut content_length_zero = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let name = name.trim().to_ascii_lowercase();
        if name == "content-type" {
            return None;
        }
        if name == "content-length" {
            content_length_zero = value.trim() == "0";
        }
    }
    if !content_length_zero {
        return None;
    }
    let code: u16 = status_line.get(9..12)?.parse().ok()?;
    let (error, detail) = match code {
        431 => (
            "request header fields too large",
            "the request's headers are larger than this server reads",
        ),
        414 => (
            "uri too long",
            "the request's URI is longer than this server reads",
        ),
        _ => (
            "bad request",
            "the request is not valid HTTP/1.1: invalid bytes in the request line, a malformed \
             header name or value (a NUL, say), or a missing, malformed or repeated Content-Length",
        ),
    };
    let body = serde_json::json!({ "error": error, "details": [detail] }).to_string();
    let reason = status_line.get(13..).unwrap_or("");
    Some(
        format!(
            "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<T: AsyncWrite + Unpin> Watched<T> {
    /// Writes what is left of a replacement; `Ready(Ok)` once it is all written.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.replacement {
            if *written == bytes.len() {
                self.replacement = None;
                break;
            }
            let n =
                std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
            self.activity.touch();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() != before {
            this.activity.touch();
            this.activity
                .read_since_request
                .store(true, Ordering::Release);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        if this.activity.read_since_request.load(Ordering::Acquire)
            && this.activity.in_flight.load(Ordering::Acquire) == 0
        {
            if let Some(json) = replacement_for(buf) {
                this.replacement = Some((json, 0));
                std::task::ready!(this.drain(cx))?;
                return Poll::Ready(Ok(buf.len()));
            }
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        // An automatic answer is a head alone: one non-empty buffer.
        let mut parts = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (parts.next(), parts.next()) {
            if this.activity.read_since_request.load(Ordering::Acquire)
                && this.activity.in_flight.load(Ordering::Acquire) == 0
            {
                if let Some(json) = replacement_for(only) {
                    this.replacement = Some((json, 0));
                    std::task::ready!(this.drain(cx))?;
                    return Poll::Ready(Ok(only.len()));
                }
            }
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bodiless_4xx_heads_are_replaced() {
        let auto = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Mon, 07 Dec 2026 10:00:00 GMT\r\n\r\n";
        let json = String::from_utf8(replacement_for(auto).unwrap()).unwrap();
        assert!(
            json.starts_with("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"),
            "{json}"
        );
        let body = json.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "bad request");
        assert!(json.contains(&format!("content-length: {}\r\n", body.len())));
        let big = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert!(String::from_utf8(replacement_for(big).unwrap())
            .unwrap()
            .contains("too large"));

        // The router's answers carry a Content-Type; anything else is left alone.
        for not in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 12\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nmore",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"<template/>",
        ] {
            assert!(replacement_for(not).is_none(), "{}", String::from_utf8_lossy(not));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_without_requests_in_flight() {
        let a = Activity::new();
        let limit = Duration::from_secs(2);
        let first = a.idle_deadline(limit).unwrap();
        let guard = a.request();
        assert!(
            a.idle_deadline(limit).is_none(),
            "busy while a request runs"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(guard);
        let later = a.idle_deadline(limit).unwrap();
        assert!(later > first, "the end of a request counts as activity");
    }
}
