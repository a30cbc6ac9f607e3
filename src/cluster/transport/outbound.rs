//! Sending: dialing every known address, and the writer that sends on each connection it made.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{identity, record_refusal, Ctx, HANDSHAKE_TIMEOUT};
use crate::cluster::broadcast::{Link, Shared};
use crate::cluster::discovery::Addrs;
use crate::cluster::pipe::{Job, Pipe};
use crate::cluster::session;
use crate::cluster::wire::{encode_body, Heartbeat, Leave, Message, RejectReason, WireError};

/// Limit on the TCP connect to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Redial delays.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Redial delay after the peer refused us (other version, cluster or secret) or turned out to
/// be a second address of a node we already send to.
const BACKOFF_REFUSED: Duration = Duration::from_secs(30);

/// Dials every address discovery or inbound peers gave, and stops dialing those that vanished.
pub(super) async fn reconcile(ctx: Ctx) {
    let s = ctx.s.clone();
    let mut discovered = s.discovered.subscribe();
    let mut learned = s.learned.subscribe();
    let mut dialers: std::collections::HashMap<SocketAddr, CancellationToken> = Default::default();
    // Every dialer's end is observed here: one that panics takes this run down with it, so the
    // supervisor logs it and starts reconcile again, which dials every address anew.
    // (Detached, not aborted, when this run ends: the cancelled dialers must unwind their links.)
    let mut running = DialerSet(tokio::task::JoinSet::new());
    // The dialers belong to this run: when it ends (a panic; it is then started again and dials
    // every address anew), they stop with it, so no dialer is left that nothing can cancel when
    // its address vanishes, and no address gets two.
    let run = s.cancel.child_token();
    let _dialers_stop = run.clone().drop_guard();
    let own = s.local_addr.get().copied();
    loop {
        let mut targets: Addrs = discovered
            .borrow_and_update()
            .iter()
            .chain(learned.borrow_and_update().iter())
            .copied()
            .collect();
        if let Some(own) = own.filter(|o| targets.remove(o)) {
            if let Ok(mut a) = s.own_addrs.lock() {
                a.insert(own);
            }
        }
        dialers.retain(|addr, cancel| {
            let keep = targets.contains(addr);
            if !keep {
                cancel.cancel();
            }
            keep
        });
        for addr in targets {
            dialers.entry(addr).or_insert_with(|| {
                let cancel = run.child_token();
                running.0.spawn(dial(addr, ctx.clone(), cancel.clone()));
                cancel
            });
        }
        tokio::select! {
            _ = s.cancel.cancelled() => return,
            r = discovered.changed() => if r.is_err() { return },
            r = learned.changed() => if r.is_err() { return },
            Some(Err(e)) = running.0.join_next(), if !running.0.is_empty() => {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
    }
}

/// The dialers of one reconcile run. Dropping a `JoinSet` aborts its tasks, which would skip the
/// dialers' own clean-up (their links and membership); they are cancelled through their token
/// instead, so they are detached here.
struct DialerSet(tokio::task::JoinSet<()>);

impl Drop for DialerSet {
    fn drop(&mut self) {
        self.0.detach_all();
    }
}

async fn connect_to(s: &Shared, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Send from the configured address, so the peer sees (and dials back) the right one.
    let bind = s.config.bind_addr;
    if !bind.is_unspecified() && bind.is_ipv4() == addr.is_ipv4() {
        socket.bind(SocketAddr::new(bind, 0))?;
    }
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Keeps one sending connection to `addr` up until cancelled.
async fn dial(addr: SocketAddr, ctx: Ctx, cancel: CancellationToken) {
    let s = ctx.s.clone();
    let mut backoff = BACKOFF_MIN;
    let mut failing_since: Option<Instant> = None;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let delay = match connect_once(&s, addr, &cancel).await {
            Dialed::Ran => {
                backoff = BACKOFF_MIN;
                failing_since = None;
                BACKOFF_MIN
            }
            Dialed::Myself => {
                if let Ok(mut own) = s.own_addrs.lock() {
                    own.insert(addr);
                }
                tracing::debug!(%addr, "cluster address is this node itself; not dialing it");
                return;
            }
            Dialed::Refused => BACKOFF_REFUSED,
            Dialed::Failed(e) => {
                if failing_since.is_none() {
                    failing_since = Some(Instant::now());
                    tracing::debug!(%addr, error = %e, "cluster peer unreachable; retrying with backoff");
                }
                let d = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                d
            }
        };
        // Up to 25% jitter, so nodes that lost a peer together do not redial in lockstep.
        let jitter = delay.mul_f64(rand_fraction() * 0.25);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay + jitter) => {}
        }
    }
}

fn rand_fraction() -> f64 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

enum Dialed {
    /// A connection was established and has now ended.
    Ran,
    /// The address is this node's own.
    Myself,
    /// The peer refused us, or we already send to that node over another address.
    Refused,
    /// Could not connect or the handshake broke.
    Failed(String),
}

async fn connect_once(s: &Arc<Shared>, addr: SocketAddr, cancel: &CancellationToken) -> Dialed {
    let mut stream = match connect_to(s, addr).await {
        Ok(st) => st,
        Err(e) => return Dialed::Failed(e.to_string()),
    };
    let id = identity(s);
    let session = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        session::connect(&mut stream, &id, s.secret.as_ref()),
    )
    .await
    {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => {
            if matches!(e.reason(), Some(RejectReason::SameNodeId { .. })) {
                return Dialed::Myself;
            }
            s.counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            if e.reason().is_some() {
                record_refusal(s, addr.to_string(), &e);
                return Dialed::Refused;
            }
            return Dialed::Failed(e.to_string());
        }
        Err(_) => {
            s.counters.handshakes_failed.fetch_add(1, Ordering::Relaxed);
            return Dialed::Failed("handshake timed out".into());
        }
    };
    let (peer, sealer, _opener) = session.into_parts();
    // The broadcaster writes to the write half directly; the read half is only kept open (a
    // sending connection never reads after the handshake). Dropping the write half, when the
    // link is gone, shuts the connection down.
    let (read_half, write_half) = stream.into_split();
    let registered = {
        let mut st = s.lock();
        if st.links.contains_key(&peer.node_id) {
            None
        } else {
            let link_id = st.next_link_id();
            let pipe = Arc::new(Pipe::new(write_half, sealer, s.config.send_queue, st.seq));
            st.links.insert(
                peer.node_id.clone(),
                Link {
                    id: link_id,
                    pipe: pipe.clone(),
                },
            );
            // The address this node really reached, not what the peer claims.
            st.members
                .outbound_up(&peer.node_id, addr, &peer.version, Instant::now());
            Some((link_id, pipe))
        }
    };
    let Some((link_id, pipe)) = registered else {
        tracing::debug!(%addr, peer = %peer.node_id, "already sending to this node over another address");
        return Dialed::Refused;
    };
    tracing::debug!(%addr, peer = %peer.node_id, "sending to cluster peer");
    let writer = Writer {
        s: s.clone(),
        peer: peer.node_id.clone(),
        pipe,
    };
    let end = writer.run(cancel).await;
    let pending = writer.pipe.close();
    {
        let mut st = s.lock();
        if st.links.get(&peer.node_id).is_some_and(|l| l.id == link_id) {
            st.links.remove(&peer.node_id);
        }
        st.members.outbound_down(&peer.node_id, pending);
    }
    drop(writer);
    drop(read_half);
    match end {
        Ok(()) => {}
        Err(e) => {
            tracing::info!(peer = %peer.node_id, %addr, error = %e, "sending to cluster peer failed; reconnecting")
        }
    }
    Dialed::Ran
}

struct Writer {
    s: Arc<Shared>,
    peer: String,
    pipe: Arc<Pipe>,
}

impl Writer {
    /// Writes what the broadcaster queued or left unsent, and heartbeats, until a Leave was sent,
    /// the task is cancelled, or a write fails.
    async fn run(&self, cancel: &CancellationToken) -> std::result::Result<(), WireError> {
        // The first heartbeat tells the peer our sequence at connect time: a peer that was
        // unreachable while we broadcast sees the gap at once. The pipe starts reserved for this
        // task, so it goes out before any broadcast.
        self.heartbeat().await?;
        let mut tick = tokio::time::interval(self.s.timing.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            // Checked between frames too: a link kept busy must still stop when told.
            if cancel.is_cancelled() {
                return Ok(());
            }
            match self.pipe.next_job()? {
                Some(Job::Frames { bytes, messages }) => self.write(&bytes, messages).await?,
                Some(Job::Leave) => return self.leave().await,
                None => {
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return Ok(()),
                        _ = self.pipe.woken() => {}
                        _ = tick.tick() => self.heartbeat().await?,
                    }
                }
            }
        }
    }

    async fn write(&self, frames: &[u8], messages: u64) -> std::result::Result<(), WireError> {
        self.pipe
            .write_all(frames, self.s.timing.gone_after)
            .await?;
        self.s.lock().members.sent(&self.peer, messages);
        Ok(())
    }

    /// Seals a message built with the sequence heartbeats report, behind everything sealed so
    /// far, and writes it.
    async fn send(&self, body: impl FnOnce(u64) -> Message) -> std::result::Result<(), WireError> {
        let frame = self.pipe.seal_with_seq(|seq| encode_body(&body(seq)))?;
        self.write(&frame, 1).await
    }

    async fn heartbeat(&self) -> std::result::Result<(), WireError> {
        let origin = self.s.node_id.clone();
        let peers = super::gossip::to_send(&self.s);
        self.send(|seq| {
            let at_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            Message::Heartbeat(Heartbeat {
                origin,
                seq,
                at_unix_ms,
                peers,
            })
        })
        .await
    }

    async fn leave(&self) -> std::result::Result<(), WireError> {
        // A final heartbeat first, so the peer knows whether it missed anything.
        self.heartbeat().await?;
        let origin = self.s.node_id.clone();
        self.send(|_| Message::Leave(Leave { origin })).await
        // The write half shuts down when the pipe is dropped, after the link is removed.
    }
}
