//! One sending connection, shared by the broadcaster and the link's writer task.
//!
//! A broadcast writes its frame straight to the socket (a non-blocking `try_write`) when nothing
//! is ahead of it: no queued message and no frame the writer task has started. On an idle link,
//! the common case for cache invalidations, that saves the hop through the writer task (a queue,
//! a task wake-up and a scheduler round per peer). Otherwise the message joins the bounded queue
//! the writer task drains, so a broadcast still never waits on a peer.
//!
//! Order: every frame is sealed (given its session sequence number) under the pipe's lock, and the
//! broadcaster writes directly only when nothing sealed earlier is still unwritten, so frames leave
//! in the order they were sealed. A direct write the socket takes only partly (its send buffer is
//! full) leaves the rest for the writer task, which finishes it, under the write timeout for peers
//! that stopped reading, before anything else.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use super::session::Sealer;
use super::wire::WireError;

/// What a peer's writer task sends from its queue.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// An encoded [`Invalidate`](super::wire::Invalidate) body and its sequence number.
    Invalidate { seq: u64, body: Arc<[u8]> },
    /// Say goodbye, then close.
    Leave,
}

/// What became of a message offered to a pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offered {
    /// Written to the socket whole, by the caller.
    Written,
    /// Queued, or partly written: the writer task finishes it.
    Handed,
    /// Not sent: the queue is full or the connection has ended.
    Dropped,
}

/// The most bytes of queued frames the writer task seals into one buffer and writes with one
/// system call: a backlog goes out in a few large writes instead of one per message.
const BATCH_BYTES: usize = 32 * 1024;

/// A buffer of the broadcaster's kept for reuse only up to this capacity (a rare large frame
/// does not pin its memory).
const SCRATCH_KEEP: usize = 16 * 1024;

/// Frames the writer task is to write, taken from the pipe.
#[derive(Debug)]
pub(crate) enum Job {
    /// Sealed frames (possibly the rest of a frame the broadcaster started), and how many
    /// messages they carry.
    Frames { bytes: Vec<u8>, messages: u64 },
    /// The Leave was dequeued: send the goodbye, then end.
    Leave,
}

struct State {
    sealer: Sealer,
    queue: VecDeque<Outgoing>,
    /// The broadcaster's frame buffer, reused from one direct write to the next.
    scratch: Vec<u8>,
    /// Sealed bytes the broadcaster could not write at once; they go before anything else.
    unsent: Vec<u8>,
    /// The writer task is writing outside the lock: nobody else may write.
    writing: bool,
    /// The writer task has ended: everything offered now is dropped.
    closed: bool,
    /// The highest invalidation sequence number sealed for this peer (at first, the broadcast
    /// sequence when the link opened: nothing up to it is ever sent here).
    hi: u64,
    /// The highest invalidation sequence number dropped for this peer. Heartbeats report
    /// `max(hi, dropped_hi)`, so the peer notices a loss even when nothing follows it.
    dropped_hi: u64,
}

/// See the module documentation.
pub(crate) struct Pipe {
    stream: OwnedWriteHalf,
    state: Mutex<State>,
    /// Wakes the writer task: something was queued or left unsent.
    wake: Notify,
    capacity: usize,
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Pipe {
    /// A pipe over `stream` whose queue holds at most `capacity` messages. It starts reserved for
    /// the writer task (`writing`), so that the task's first heartbeat goes out before any
    /// broadcast; `start_seq` is the broadcast sequence when the link opened.
    pub fn new(stream: OwnedWriteHalf, sealer: Sealer, capacity: usize, start_seq: u64) -> Pipe {
        Pipe {
            stream,
            state: Mutex::new(State {
                sealer,
                queue: VecDeque::new(),
                scratch: Vec::new(),
                unsent: Vec::new(),
                writing: true,
                closed: false,
                hi: start_seq,
                dropped_hi: 0,
            }),
            wake: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here can panic half-way through an update that matters more than stopping the
        // link would; keep going with the data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends invalidation `seq` (the encoded body `body`) without ever waiting: written at once
    /// when the link is idle, else queued for the writer task, else dropped.
    pub fn offer(&self, seq: u64, body: &Arc<[u8]>) -> Offered {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.closed {
            st.dropped_hi = st.dropped_hi.max(seq);
            return Offered::Dropped;
        }
        if !st.writing && st.unsent.is_empty() && st.queue.is_empty() {
            // A frame that cannot be sealed (too large) goes through the queue, where the writer
            // task fails on it and ends the link exactly as it always did.
            st.scratch.clear();
            if st.sealer.seal_frame_into(body, &mut st.scratch).is_ok() {
                st.hi = st.hi.max(seq);
                let frame = &st.scratch;
                match self.stream.try_write(frame) {
                    Ok(n) if n == frame.len() => {
                        if st.scratch.capacity() > SCRATCH_KEEP {
                            st.scratch = Vec::new();
                        }
                        return Offered::Written;
                    }
                    Ok(n) => st.unsent = frame[n..].to_vec(),
                    // Would block, or a broken connection: the writer task waits for room
                    // (under its timeout) or meets the error and ends the link.
                    Err(_) => st.unsent = std::mem::take(&mut st.scratch),
                }
                drop(guard);
                self.wake.notify_one();
                return Offered::Handed;
            }
        }
        if st.queue.len() >= self.capacity {
            st.dropped_hi = st.dropped_hi.max(seq);
            return Offered::Dropped;
        }
        st.queue.push_back(Outgoing::Invalidate {
            seq,
            body: body.clone(),
        });
        drop(guard);
        self.wake.notify_one();
        Offered::Handed
    }

    /// Queues the goodbye behind everything already queued; `false` when the queue is full or
    /// the link has ended (the peer then sees the connection close instead).
    pub fn leave(&self) -> bool {
        let mut st = self.lock();
        if st.closed || st.queue.len() >= self.capacity {
            return false;
        }
        st.queue.push_back(Outgoing::Leave);
        drop(st);
        self.wake.notify_one();
        true
    }

    /// True once the writer task has ended.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Ends the link: later offers are dropped. Returns whether messages were still pending.
    pub fn close(&self) -> bool {
        let mut st = self.lock();
        st.closed = true;
        st.writing = false;
        !st.queue.is_empty() || !st.unsent.is_empty()
    }

    /// For the writer task: the next frames to write, in order (the rest of a broadcaster's
    /// frame, then the queue: as many queued invalidations as fit [`BATCH_BYTES`], sealed into
    /// one buffer for one write), or `None` when there is nothing. A `Some` reserves the socket
    /// for the writer task until it asks again and nothing is left.
    pub fn next_job(&self) -> Result<Option<Job>, WireError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let job = if !st.unsent.is_empty() {
            Job::Frames {
                bytes: std::mem::take(&mut st.unsent),
                messages: 1,
            }
        } else {
            match st.queue.front() {
                None => {
                    st.writing = false;
                    return Ok(None);
                }
                Some(Outgoing::Leave) => {
                    st.queue.pop_front();
                    Job::Leave
                }
                Some(Outgoing::Invalidate { .. }) => {
                    let mut bytes = Vec::new();
                    let mut messages = 0;
                    while bytes.len() < BATCH_BYTES {
                        let Some(Outgoing::Invalidate { seq, body }) = st.queue.front() else {
                            break;
                        };
                        // A frame that cannot be sealed ends the link, as it always did; the
                        // frames sealed before it in this batch are lost with the connection.
                        st.sealer.seal_frame_into(body, &mut bytes)?;
                        st.hi = st.hi.max(*seq);
                        messages += 1;
                        st.queue.pop_front();
                    }
                    Job::Frames { bytes, messages }
                }
            }
        };
        st.writing = true;
        Ok(Some(job))
    }

    /// For the writer task: seals the message `body` builds (from the sequence number
    /// heartbeats report, `max(hi, dropped_hi)`) behind everything sealed so far, and reserves the
    /// socket.
    pub fn seal_with_seq(
        &self,
        body: impl FnOnce(u64) -> Result<Vec<u8>, WireError>,
    ) -> Result<Vec<u8>, WireError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let encoded = body(st.hi.max(st.dropped_hi))?;
        let mut frame = std::mem::take(&mut st.unsent);
        st.sealer.seal_frame_into(&encoded, &mut frame)?;
        st.writing = true;
        Ok(frame)
    }

    /// Resolves when the broadcaster queued something or left a frame unsent.
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Writes all of `buf`, waiting for room in the socket at most `limit` in all (a peer that
    /// stops reading must not hold the writer task forever).
    pub async fn write_all(&self, buf: &[u8], limit: Duration) -> Result<(), WireError> {
        let write = async {
            let mut at = 0;
            while at < buf.len() {
                match self.stream.try_write(&buf[at..]) {
                    Ok(0) => return Err(std::io::Error::from(ErrorKind::WriteZero)),
                    Ok(n) => at += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.stream.writable().await?,
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        };
        match tokio::time::timeout(limit, write).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(WireError::Io(std::io::Error::new(
                ErrorKind::TimedOut,
                "peer stopped reading",
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cluster::wire::FrameReader;
    use crate::cluster::MAX_FRAME;
    use tokio::net::{TcpListener, TcpStream};

    /// A pipe over a loopback connection, and the receiving end.
    async fn pair(capacity: usize) -> (Pipe, tokio::net::tcp::OwnedReadHalf, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (read_half, write_half) = dialed.unwrap().into_split();
        let pipe = Pipe::new(write_half, Sealer::plain(), capacity, 0);
        (pipe, read_half, accepted.unwrap().0)
    }

    /// What the writer task does with its queue, minus heartbeats: until nothing is left.
    async fn drain(pipe: &Pipe) {
        while let Some(job) = pipe.next_job().unwrap() {
            match job {
                Job::Frames { bytes, .. } => pipe
                    .write_all(&bytes, Duration::from_secs(5))
                    .await
                    .unwrap(),
                Job::Leave => {}
            }
        }
    }

    fn json(seq: u64, pad: usize) -> Arc<[u8]> {
        format!("{{\"seq\":{seq},\"pad\":\"{}\"}}", "x".repeat(pad))
            .into_bytes()
            .into()
    }

    fn seq_of(payload: &[u8]) -> u64 {
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        v["seq"].as_u64().unwrap()
    }

    #[tokio::test]
    async fn an_idle_link_is_written_directly_and_a_reserved_one_queues() {
        let (pipe, _r, mut peer) = pair(8).await;
        // Reserved for the writer task's first heartbeat: broadcasts queue behind it.
        assert_eq!(pipe.offer(1, &json(1, 0)), Offered::Handed);
        assert_eq!(pipe.offer(2, &json(2, 0)), Offered::Handed);
        drain(&pipe).await;
        // Idle now: written by the caller itself.
        assert_eq!(pipe.offer(3, &json(3, 0)), Offered::Written);
        let mut frames = FrameReader::new(MAX_FRAME);
        for want in 1..=3 {
            assert_eq!(seq_of(&frames.next(&mut peer).await.unwrap()), want);
        }
    }

    #[tokio::test]
    async fn a_backlog_is_sealed_into_one_write_up_to_the_batch_size() {
        let (pipe, _r, mut peer) = pair(100).await;
        // Reserved for the writer task's first heartbeat: these queue.
        for seq in 1..=10 {
            assert_eq!(pipe.offer(seq, &json(seq, 0)), Offered::Handed);
        }
        // Large ones: a batch stops once it holds BATCH_BYTES.
        for seq in 11..=20 {
            assert_eq!(pipe.offer(seq, &json(seq, 10_000)), Offered::Handed);
        }
        let mut batches = Vec::new();
        while let Some(job) = pipe.next_job().unwrap() {
            let Job::Frames { bytes, messages } = job else {
                panic!("no Leave was queued")
            };
            pipe.write_all(&bytes, Duration::from_secs(5))
                .await
                .unwrap();
            batches.push(messages);
        }
        // About 22 bytes a small frame, 10 KB a large one: a batch takes frames until it holds
        // at least BATCH_BYTES (32 KiB).
        assert_eq!(batches, [10 + 4, 4, 2]);
        let mut frames = FrameReader::new(MAX_FRAME);
        for want in 1..=20 {
            assert_eq!(seq_of(&frames.next(&mut peer).await.unwrap()), want);
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_heartbeats_report_the_loss() {
        let (pipe, _r, mut peer) = pair(2).await;
        assert_eq!(pipe.offer(1, &json(1, 0)), Offered::Handed);
        assert_eq!(pipe.offer(2, &json(2, 0)), Offered::Handed);
        assert_eq!(pipe.offer(3, &json(3, 0)), Offered::Dropped);
        assert!(!pipe.leave(), "no room for the goodbye either");
        let hb = pipe
            .seal_with_seq(|seq| Ok(format!("{{\"seq\":{seq}}}").into_bytes()))
            .unwrap();
        pipe.write_all(&hb, Duration::from_secs(5)).await.unwrap();
        drain(&pipe).await;
        let mut frames = FrameReader::new(MAX_FRAME);
        let mut seqs = Vec::new();
        for _ in 0..3 {
            seqs.push(seq_of(&frames.next(&mut peer).await.unwrap()));
        }
        // The heartbeat went first (it was sealed before the queued messages were) and reported
        // the dropped 3.
        assert_eq!(seqs, [3, 1, 2]);
        assert!(!pipe.close(), "nothing pending after the drain");
        assert!(pipe.is_closed());
        assert_eq!(pipe.offer(4, &json(4, 0)), Offered::Dropped, "closed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_writes_keep_order_when_the_socket_fills_and_a_backlog_builds() {
        let (pipe, _r, mut peer) = pair(10_000).await;
        let pipe = Arc::new(pipe);
        drain(&pipe).await;
        // Nobody reads yet: the direct writes fill the socket buffers, one is taken only in part
        // and the rest queue behind it.
        // 32 MiB: more than loopback's socket buffers take.
        let n = 4_000u64;
        let mut written = 0;
        for seq in 1..=n {
            match pipe.offer(seq, &json(seq, 8_000)) {
                Offered::Written => written += 1,
                Offered::Handed => {}
                Offered::Dropped => panic!("queue of 10,000 overflowed at {seq}"),
            }
        }
        assert!(written > 0, "the first ones were written directly");
        assert!(written < n, "the socket filled up and a backlog built");
        // The writer task drains the backlog while the peer reads; broadcasts go on meanwhile.
        let writer = {
            let pipe = pipe.clone();
            tokio::spawn(async move { drain(&pipe).await })
        };
        let mut frames = FrameReader::new(MAX_FRAME);
        for want in 1..=n {
            assert_eq!(seq_of(&frames.next(&mut peer).await.unwrap()), want);
        }
        writer.await.unwrap();
        assert_eq!(pipe.offer(n + 1, &json(n + 1, 0)), Offered::Written);
        assert_eq!(seq_of(&frames.next(&mut peer).await.unwrap()), n + 1);
    }
}
