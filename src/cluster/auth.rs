//! The handshake and the session layer: who the peer is, whether it knows the cluster secret, and
//! the MAC on every frame after that.
//!
//! Longer than 600 lines because the handshake states, the session sealer/opener and their tests
//! (half the file) are one protocol, read together.
//!
//! # Handshake
//! ```text
//! client                                              server
//!   Hello { identity, nonce_c }                 ->
//!                                               <-      Welcome { identity, nonce_s, proof_s }
//!                                                       (or Reject { reason, message })
//!   Proof { proof_c }   (only with a secret)    ->
//!   (or Reject { reason, message })
//! ```
//! Both sides check magic, protocol, cluster name and release, and refuse a peer with their own
//! node id. With a `CLUSTER_SECRET` ([`ClusterSecret`]):
//!
//! * `proof_s = HMAC-SHA256(secret, "server" || nonce_c || nonce_s || server node_id)`, checked by
//!   the client;
//! * `proof_c = HMAC-SHA256(secret, "client" || nonce_s || nonce_c || client node_id)`, checked by
//!   the server;
//! * `session_key = HMAC-SHA256(secret, "session" || nonce_c || nonce_s)`.
//!
//! Tags are compared in constant time (`hmac`'s `verify_slice`). The labels keep a proof from
//! being replayed as the other side's, and fresh nonces on both sides keep one from being replayed
//! on another connection. A secret on one side only fails the handshake on both: the side with the
//! secret refuses (its [`HandshakeError`] says which side lacks it) and sends a
//! [`RejectReason::Auth`] to the other.
//!
//! The handshake itself ([`client_start`], [`server_on_hello`], [`client_on_welcome`],
//! [`server_on_proof`]) does no IO; [`connect`] and [`accept`] drive it over any
//! `AsyncRead + AsyncWrite` stream. Handshake frames are plain JSON envelopes.
//!
//! # Session frames
//! With a secret, every later frame is sealed:
//! ```text
//! [32-byte MAC][seq: u64 big-endian][envelope JSON]
//! MAC = HMAC-SHA256(session_key, direction || seq || json)   direction: b'C' client->server, b'S' server->client
//! ```
//! `seq` starts at 1 and increases by one per frame in each direction. It travels in the clear so
//! [`Opener::open`] can tell a replay ([`WireError::Replay`]) from a forgery
//! ([`WireError::BadMac`]) or a dropped frame ([`WireError::SeqGap`]); it is checked only after the
//! MAC, so an unauthenticated frame never moves the counter. The direction byte stops a frame
//! being reflected back to its sender.
//!
//! Without a secret, session frames are the plain envelope JSON and nothing is authenticated; the
//! [`Sealer`] / [`Opener`] API is the same, so callers do not branch.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use super::wire::{
    read_frame, write_frame, Envelope, Hello, Message, Nonce, Proof, Reject, RejectReason, Tag,
    Welcome, WireError, FRAME_HEADER_LEN, MAGIC, MAX_FRAME, PROTOCOL, TAG_LEN,
};

type HmacSha256 = Hmac<Sha256>;

/// Bytes a sealed frame adds in front of the JSON: the MAC and the sequence number.
pub const SEAL_OVERHEAD: usize = TAG_LEN + 8;

/// The shared `CLUSTER_SECRET`. Its `Debug` output is `ClusterSecret(***)`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(Vec<u8>);

impl ClusterSecret {
    /// The secret, or `None` for an empty value (an empty `CLUSTER_SECRET` means "no secret").
    pub fn new(secret: impl AsRef<[u8]>) -> Option<ClusterSecret> {
        let s = secret.as_ref();
        (!s.is_empty()).then(|| ClusterSecret(s.to_vec()))
    }

    /// HMAC-SHA256 under the secret of the concatenated `parts` (for messages outside a session,
    /// such as multicast announcements). Put a distinct label first so tags of one message
    /// kind can never be replayed as another.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        tag(&self.0, parts)
    }

    /// Checks a [`ClusterSecret::mac`] tag in constant time.
    pub fn verify(&self, parts: &[&[u8]], expected: &[u8]) -> bool {
        verify(&self.0, parts, expected)
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(***)")
    }
}

/// What a node says about itself in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The cluster name; peers must have the same.
    pub cluster: String,
    /// This node's id, unique in the cluster.
    pub node_id: String,
    /// This node's release; peers must have the same.
    pub version: String,
    /// The `host:port` where this node's cluster channel listens.
    pub advertised_addr: String,
}

impl Identity {
    /// An identity with this build's release (`CARGO_PKG_VERSION`) as `version`.
    pub fn new(
        cluster: impl Into<String>,
        node_id: impl Into<String>,
        advertised_addr: impl Into<String>,
    ) -> Identity {
        Identity {
            cluster: cluster.into(),
            node_id: node_id.into(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            advertised_addr: advertised_addr.into(),
        }
    }
}

/// The peer at the other end of an established [`Session`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its node id.
    pub node_id: String,
    /// Its release (equal to ours).
    pub version: String,
    /// Where its cluster channel listens.
    pub advertised_addr: String,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer refused this node.
    #[error("the peer refused the connection: {0}")]
    RejectedByPeer(Reject),
    /// This node refused the peer; [`connect`] and [`accept`] send this Reject to it.
    #[error("refused the peer: {0}")]
    Refused(Reject),
    /// The peer sent a message that does not belong at this step.
    #[error("expected a {expected} message, got {got}")]
    Unexpected {
        /// The message type expected.
        expected: &'static str,
        /// The message type received.
        got: &'static str,
    },
    /// The peer's bytes could not be read or decoded.
    #[error(transparent)]
    Wire(#[from] WireError),
}

impl HandshakeError {
    /// The reason of the refusal, whichever side refused.
    pub fn reason(&self) -> Option<&RejectReason> {
        match self {
            HandshakeError::RejectedByPeer(r) | HandshakeError::Refused(r) => Some(&r.reason),
            _ => None,
        }
    }

    /// The Reject this node should send the peer before closing, if any.
    pub fn reject_to_send(&self) -> Option<Reject> {
        match self {
            HandshakeError::Refused(r) => Some(r.clone()),
            HandshakeError::Unexpected { .. } => {
                Some(reject(RejectReason::Protocol, self.to_string()))
            }
            HandshakeError::Wire(
                e @ (WireError::BadMagic { .. }
                | WireError::UnsupportedProtocol { .. }
                | WireError::Malformed(_)
                | WireError::TooLarge { .. }
                | WireError::Empty),
            ) => Some(reject(RejectReason::Protocol, e.to_string())),
            _ => None,
        }
    }
}

/// The most bytes of a peer's own field (cluster name, release, node id) a [`Reject`] or an error
/// quotes back. Real values are far shorter; a hostile Hello may carry tens of kilobytes.
const ECHO_MAX: usize = 128;
/// The most bytes of a [`Reject`] message. Even if every byte needs a 6-byte JSON escape, the
/// Reject stays far below [`MAX_FRAME`], so it is always sent instead of failing to encode.
const REJECT_MESSAGE_MAX: usize = 1024;

/// `s` cut to at most `max` bytes on a char boundary, with a marker saying how long it was, so
/// text quoted from a peer can neither outgrow a frame nor flood the logs.
fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...({} bytes)", &s[..end], s.len())
}

fn reject(reason: RejectReason, message: impl Into<String>) -> Reject {
    Reject {
        reason: clip_reason(reason),
        message: clip(&message.into(), REJECT_MESSAGE_MAX),
    }
}

/// The reason with every peer-supplied field clipped to [`ECHO_MAX`].
fn clip_reason(reason: RejectReason) -> RejectReason {
    match reason {
        RejectReason::ClusterName { ours, theirs } => RejectReason::ClusterName {
            ours: clip(&ours, ECHO_MAX),
            theirs: clip(&theirs, ECHO_MAX),
        },
        RejectReason::Version { ours, theirs } => RejectReason::Version {
            ours: clip(&ours, ECHO_MAX),
            theirs: clip(&theirs, ECHO_MAX),
        },
        RejectReason::SameNodeId { node_id } => RejectReason::SameNodeId {
            node_id: clip(&node_id, ECHO_MAX),
        },
        other => other,
    }
}

/// A Reject received from a peer, bounded like the ones this node sends: it is logged and kept in
/// the `/cluster` report, and a hostile peer may fill a whole frame with it.
fn received(r: Reject) -> HandshakeError {
    HandshakeError::RejectedByPeer(reject(r.reason, r.message))
}

// ---------------------------------------------------------------------------------------------
// Keys and MACs

/// Which way a frame travels; part of every frame MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the node that connected to the node that accepted.
    ClientToServer,
    /// From the node that accepted to the node that connected.
    ServerToClient,
}

impl Direction {
    fn byte(self) -> u8 {
        match self {
            Direction::ClientToServer => b'C',
            Direction::ServerToClient => b'S',
        }
    }
}

#[derive(Clone)]
struct SessionKey([u8; TAG_LEN]);

fn hmac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac =
        <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        mac.update(p);
    }
    mac
}

fn tag(key: &[u8], parts: &[&[u8]]) -> [u8; TAG_LEN] {
    hmac(key, parts).finalize().into_bytes().into()
}

fn verify(key: &[u8], parts: &[&[u8]], expected: &[u8]) -> bool {
    hmac(key, parts).verify_slice(expected).is_ok()
}

fn server_proof_parts<'a>(nc: &'a Nonce, ns: &'a Nonce, server_id: &'a str) -> [&'a [u8]; 4] {
    [b"server", &nc.0, &ns.0, server_id.as_bytes()]
}

fn client_proof_parts<'a>(nc: &'a Nonce, ns: &'a Nonce, client_id: &'a str) -> [&'a [u8]; 4] {
    [b"client", &ns.0, &nc.0, client_id.as_bytes()]
}

fn session_key(secret: &ClusterSecret, nc: &Nonce, ns: &Nonce) -> SessionKey {
    SessionKey(tag(&secret.0, &[b"session", &nc.0, &ns.0]))
}

/// Seals outgoing session frames: one per connection and direction.
pub struct Sealer {
    key: Option<SessionKey>,
    direction: Direction,
    last_seq: u64,
}

/// Opens incoming session frames: checks the MAC and the sequence number.
pub struct Opener {
    key: Option<SessionKey>,
    direction: Direction,
    last_seq: u64,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("authenticated", &self.key.is_some())
            .field("direction", &self.direction)
            .field("last_seq", &self.last_seq)
            .finish()
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("authenticated", &self.key.is_some())
            .field("direction", &self.direction)
            .field("last_seq", &self.last_seq)
            .finish()
    }
}

impl Sealer {
    /// A sealer without a key: frames go out as plain JSON.
    pub fn plain(direction: Direction) -> Sealer {
        Sealer {
            key: None,
            direction,
            last_seq: 0,
        }
    }

    /// True when frames carry a MAC.
    pub fn is_authenticated(&self) -> bool {
        self.key.is_some()
    }

    /// The direction of the frames this sealer makes.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// The sequence number of the last sealed frame (0 before the first; always 0 without a key).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The frame payload for `json`: `[MAC][seq][json]` with a key, `json` without.
    ///
    /// Fails, without using a sequence number, when `json` is empty or the result would exceed
    /// [`MAX_FRAME`].
    pub fn seal(&mut self, json: &[u8]) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.seal_into(json, &mut out)?;
        Ok(out)
    }

    /// The whole frame for `json`: the frame header ([`FRAME_HEADER_LEN`] bytes) and the payload
    /// [`Sealer::seal`] makes, in one buffer, ready to write. Fails like [`Sealer::seal`].
    pub fn seal_frame(&mut self, json: &[u8]) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN + SEAL_OVERHEAD + json.len());
        out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
        self.seal_into(json, &mut out)?;
        // `seal_into` refused anything over MAX_FRAME, so the length fits a u32.
        let len = u32::try_from(out.len() - FRAME_HEADER_LEN).map_err(|_| WireError::TooLarge {
            len: out.len() - FRAME_HEADER_LEN,
            max: MAX_FRAME,
        })?;
        out[..FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        Ok(out)
    }

    /// Appends the payload [`Sealer::seal`] makes to `out`; on failure nothing is appended and no
    /// sequence number is used.
    fn seal_into(&mut self, json: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
        if json.is_empty() {
            return Err(WireError::Empty);
        }
        let Some(key) = &self.key else {
            if json.len() > MAX_FRAME {
                return Err(WireError::TooLarge {
                    len: json.len(),
                    max: MAX_FRAME,
                });
            }
            out.extend_from_slice(json);
            return Ok(());
        };
        let len = json.len().saturating_add(SEAL_OVERHEAD);
        if len > MAX_FRAME {
            return Err(WireError::TooLarge {
                len,
                max: MAX_FRAME,
            });
        }
        let seq = self
            .last_seq
            .checked_add(1)
            .ok_or(WireError::SeqExhausted)?;
        let seq_bytes = seq.to_be_bytes();
        let mac = tag(&key.0, &[&[self.direction.byte()], &seq_bytes, json]);
        out.reserve(len);
        out.extend_from_slice(&mac);
        out.extend_from_slice(&seq_bytes);
        out.extend_from_slice(json);
        self.last_seq = seq;
        Ok(())
    }

    /// Encodes, seals and writes `envelope` as one frame.
    pub async fn send<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        envelope: &Envelope,
    ) -> Result<(), WireError> {
        let frame = self.seal(&envelope.encode()?)?;
        write_frame(w, &frame).await
    }
}

impl Opener {
    /// An opener without a key: frames are taken as plain JSON.
    pub fn plain(direction: Direction) -> Opener {
        Opener {
            key: None,
            direction,
            last_seq: 0,
        }
    }

    /// True when frames must carry a valid MAC.
    pub fn is_authenticated(&self) -> bool {
        self.key.is_some()
    }

    /// The direction of the frames this opener accepts.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// The sequence number of the last frame accepted (0 before the first; always 0 without a key).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The JSON inside a frame payload.
    ///
    /// With a key, checks in this order: size ([`WireError::TooLarge`], [`WireError::Truncated`]),
    /// the MAC ([`WireError::BadMac`], also for a frame of the other direction), then the sequence
    /// number ([`WireError::Replay`] when not above the last accepted one, [`WireError::SeqGap`]
    /// when frames were skipped). A rejected frame leaves the counter unchanged.
    pub fn open<'a>(&mut self, frame: &'a [u8]) -> Result<&'a [u8], WireError> {
        if frame.len() > MAX_FRAME {
            return Err(WireError::TooLarge {
                len: frame.len(),
                max: MAX_FRAME,
            });
        }
        let Some(key) = &self.key else {
            if frame.is_empty() {
                return Err(WireError::Empty);
            }
            return Ok(frame);
        };
        let Some((mac, rest)) = frame.split_first_chunk::<TAG_LEN>() else {
            return Err(WireError::Truncated);
        };
        let Some((seq_bytes, json)) = rest.split_first_chunk::<8>() else {
            return Err(WireError::Truncated);
        };
        if !verify(&key.0, &[&[self.direction.byte()], seq_bytes, json], mac) {
            return Err(WireError::BadMac);
        }
        let seq = u64::from_be_bytes(*seq_bytes);
        if seq <= self.last_seq {
            return Err(WireError::Replay {
                got: seq,
                expected_above: self.last_seq,
            });
        }
        if seq != self.last_seq + 1 {
            return Err(WireError::SeqGap {
                got: seq,
                expected: self.last_seq + 1,
            });
        }
        if json.is_empty() {
            return Err(WireError::Empty);
        }
        self.last_seq = seq;
        Ok(json)
    }

    /// Reads one frame, opens it and decodes the envelope for cluster `cluster`.
    pub async fn recv<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        cluster: &str,
    ) -> Result<Envelope, WireError> {
        let frame = read_frame(r, MAX_FRAME).await?;
        Envelope::decode(self.open(&frame)?, cluster)
    }
}

/// An established connection: the peer, and the sealer and opener for its frames.
#[derive(Debug)]
#[non_exhaustive]
pub struct Session {
    /// Who is at the other end.
    pub peer: Peer,
    /// Seals what this node sends.
    pub sealer: Sealer,
    /// Opens what the peer sends.
    pub opener: Opener,
}

impl Session {
    fn new(peer: Peer, key: Option<SessionKey>, outgoing: Direction) -> Session {
        let incoming = match outgoing {
            Direction::ClientToServer => Direction::ServerToClient,
            Direction::ServerToClient => Direction::ClientToServer,
        };
        Session {
            peer,
            sealer: Sealer {
                key: key.clone(),
                direction: outgoing,
                last_seq: 0,
            },
            opener: Opener {
                key,
                direction: incoming,
                last_seq: 0,
            },
        }
    }

    /// True when both ends proved the cluster secret and frames carry MACs.
    pub fn is_authenticated(&self) -> bool {
        self.sealer.is_authenticated()
    }

    /// The parts, for a reader task and a writer task.
    pub fn into_parts(self) -> (Peer, Sealer, Opener) {
        (self.peer, self.sealer, self.opener)
    }
}

// ---------------------------------------------------------------------------------------------
// The handshake, without IO

/// The client's state between its [`Hello`] and the server's [`Welcome`].
#[derive(Debug)]
pub struct ClientPending {
    identity: Identity,
    secret: Option<ClusterSecret>,
    nonce_c: Nonce,
}

/// The server's state between its [`Welcome`] and the client's [`Proof`].
#[derive(Debug)]
pub struct ServerPending {
    peer: Peer,
    secret: Option<ClusterSecret>,
    nonce_c: Nonce,
    nonce_s: Nonce,
}

impl ServerPending {
    /// True when the server must wait for a [`Proof`] (it has a secret).
    pub fn expects_proof(&self) -> bool {
        self.secret.is_some()
    }
}

/// Step 1, client: the [`Hello`] to send, with a fresh nonce.
pub fn client_start(identity: &Identity, secret: Option<&ClusterSecret>) -> (Hello, ClientPending) {
    let nonce_c = Nonce::random();
    let hello = Hello {
        magic: MAGIC,
        protocol: PROTOCOL,
        cluster: identity.cluster.clone(),
        node_id: identity.node_id.clone(),
        version: identity.version.clone(),
        advertised_addr: identity.advertised_addr.clone(),
        nonce: nonce_c,
    };
    let pending = ClientPending {
        identity: identity.clone(),
        secret: secret.cloned(),
        nonce_c,
    };
    (hello, pending)
}

/// Checks the identity fields every Hello and Welcome carry.
fn check_peer(
    ours: &Identity,
    magic: u32,
    protocol: u16,
    cluster: &str,
    version: &str,
    node_id: &str,
) -> Result<(), Reject> {
    if magic != MAGIC {
        return Err(reject(
            RejectReason::Protocol,
            format!("bad magic number {magic:#010x}, expected {MAGIC:#010x}"),
        ));
    }
    if protocol != PROTOCOL {
        return Err(reject(
            RejectReason::Protocol,
            format!("cluster protocol version {protocol} is not supported (this node speaks {PROTOCOL})"),
        ));
    }
    if cluster != ours.cluster {
        // Every field quoted from the peer is clipped first: a ~40 KB name echoed twice made the
        // Reject outgrow MAX_FRAME, and then it was silently not sent.
        let cluster = clip(cluster, ECHO_MAX);
        return Err(reject(
            RejectReason::ClusterName {
                ours: ours.cluster.clone(),
                theirs: cluster.clone(),
            },
            format!(
                "cluster name mismatch: node {:?} is in cluster {:?}, the peer in cluster {cluster:?}",
                ours.node_id, ours.cluster
            ),
        ));
    }
    if version != ours.version {
        let version = clip(version, ECHO_MAX);
        return Err(reject(
            RejectReason::Version {
                ours: ours.version.clone(),
                theirs: version.clone(),
            },
            format!(
                "release mismatch: node {:?} runs {}, the peer runs {version}; all nodes of a cluster must run the same release",
                ours.node_id, ours.version
            ),
        ));
    }
    if node_id.is_empty() {
        return Err(reject(
            RejectReason::Protocol,
            "the peer sent an empty node id",
        ));
    }
    if node_id == ours.node_id {
        return Err(reject(
            RejectReason::SameNodeId {
                node_id: node_id.to_string(),
            },
            format!("the peer has this node's own id {node_id:?}: a node connected to itself, or two nodes share an id"),
        ));
    }
    Ok(())
}

/// Step 2, server: checks the [`Hello`] and answers with a [`Welcome`] (with a proof when the
/// server has a secret), or with the [`Reject`] to send.
pub fn server_on_hello(
    identity: &Identity,
    secret: Option<&ClusterSecret>,
    hello: &Hello,
) -> Result<(Welcome, ServerPending), Reject> {
    check_peer(
        identity,
        hello.magic,
        hello.protocol,
        &hello.cluster,
        &hello.version,
        &hello.node_id,
    )?;
    let nonce_s = Nonce::random();
    let proof = secret.map(|s| {
        Tag(tag(
            &s.0,
            &server_proof_parts(&hello.nonce, &nonce_s, &identity.node_id),
        ))
    });
    let welcome = Welcome {
        magic: MAGIC,
        protocol: PROTOCOL,
        cluster: identity.cluster.clone(),
        node_id: identity.node_id.clone(),
        version: identity.version.clone(),
        advertised_addr: identity.advertised_addr.clone(),
        nonce: nonce_s,
        proof,
    };
    let pending = ServerPending {
        peer: Peer {
            node_id: hello.node_id.clone(),
            version: hello.version.clone(),
            advertised_addr: hello.advertised_addr.clone(),
        },
        secret: secret.cloned(),
        nonce_c: hello.nonce,
        nonce_s,
    };
    Ok((welcome, pending))
}

/// Step 3, client: checks the [`Welcome`] and the server's proof. Returns the [`Proof`] to send
/// (`None` without a secret) and the session, which is usable once the proof is sent.
pub fn client_on_welcome(
    pending: ClientPending,
    welcome: &Welcome,
) -> Result<(Option<Proof>, Session), HandshakeError> {
    let ClientPending {
        identity,
        secret,
        nonce_c,
    } = pending;
    check_peer(
        &identity,
        welcome.magic,
        welcome.protocol,
        &welcome.cluster,
        &welcome.version,
        &welcome.node_id,
    )
    .map_err(HandshakeError::Refused)?;
    if nonce_c == welcome.nonce {
        return Err(HandshakeError::Refused(reject(
            RejectReason::Protocol,
            "the server echoed the client's nonce",
        )));
    }
    let peer = Peer {
        node_id: welcome.node_id.clone(),
        version: welcome.version.clone(),
        advertised_addr: welcome.advertised_addr.clone(),
    };
    let nonce_s = welcome.nonce;
    match (&secret, &welcome.proof) {
        (None, None) => Ok((None, Session::new(peer, None, Direction::ClientToServer))),
        (Some(s), Some(proof_s)) => {
            let parts = server_proof_parts(&nonce_c, &nonce_s, &welcome.node_id);
            if !verify(&s.0, &parts, &proof_s.0) {
                return Err(auth_refusal(format!(
                    "node {:?} proved a different CLUSTER_SECRET than this node's",
                    welcome.node_id
                )));
            }
            let proof_c = Tag(tag(
                &s.0,
                &client_proof_parts(&nonce_c, &nonce_s, &identity.node_id),
            ));
            let key = session_key(s, &nonce_c, &nonce_s);
            Ok((
                Some(Proof { proof: proof_c }),
                Session::new(peer, Some(key), Direction::ClientToServer),
            ))
        }
        (Some(_), None) => Err(auth_refusal(format!(
            "node {:?} has no CLUSTER_SECRET but node {:?} requires one",
            welcome.node_id, identity.node_id
        ))),
        (None, Some(_)) => Err(auth_refusal(format!(
            "node {:?} requires a CLUSTER_SECRET but node {:?} has none",
            welcome.node_id, identity.node_id
        ))),
    }
}

/// Step 4, server: checks the client's [`Proof`] (`None` when none was sent, which is right
/// only without a secret) and returns the session.
pub fn server_on_proof(
    pending: ServerPending,
    proof: Option<&Proof>,
) -> Result<Session, HandshakeError> {
    let ServerPending {
        peer,
        secret,
        nonce_c,
        nonce_s,
    } = pending;
    match (&secret, proof) {
        (None, None) => Ok(Session::new(peer, None, Direction::ServerToClient)),
        (Some(s), Some(p)) => {
            let parts = client_proof_parts(&nonce_c, &nonce_s, &peer.node_id);
            if !verify(&s.0, &parts, &p.proof.0) {
                return Err(auth_refusal(format!(
                    "node {:?} proved a different CLUSTER_SECRET than this node's",
                    peer.node_id
                )));
            }
            let key = session_key(s, &nonce_c, &nonce_s);
            Ok(Session::new(peer, Some(key), Direction::ServerToClient))
        }
        (Some(_), None) => Err(auth_refusal(format!(
            "node {:?} sent no proof of the CLUSTER_SECRET",
            peer.node_id
        ))),
        (None, Some(_)) => Err(auth_refusal(format!(
            "node {:?} sent a proof but this node has no CLUSTER_SECRET",
            peer.node_id
        ))),
    }
}

fn auth_refusal(message: String) -> HandshakeError {
    HandshakeError::Refused(reject(RejectReason::Auth, message))
}

// ---------------------------------------------------------------------------------------------
// The handshake over a stream

async fn send_plain<S: AsyncWrite + Unpin>(
    stream: &mut S,
    cluster: &str,
    body: Message,
) -> Result<(), WireError> {
    write_frame(stream, &Envelope::new(cluster, body).encode()?).await
}

async fn recv_plain<S: AsyncRead + Unpin>(
    stream: &mut S,
    cluster: &str,
) -> Result<Envelope, WireError> {
    Envelope::decode(&read_frame(stream, MAX_FRAME).await?, cluster)
}

/// Sends this node's refusal, if the error calls for one, and returns the error.
async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    cluster: &str,
    err: HandshakeError,
) -> HandshakeError {
    if let Some(r) = err.reject_to_send() {
        // Best effort: the peer may already be gone, and the error to report is `err`.
        let _ = send_plain(stream, cluster, Message::Reject(r)).await;
    }
    err
}

/// Runs the client side of the handshake on `stream` (a connection this node opened).
///
/// On failure, sends the peer a [`Reject`] when this node is the one refusing. No timeout is
/// applied: wrap the call in `tokio::time::timeout`.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    identity: &Identity,
    secret: Option<&ClusterSecret>,
) -> Result<Session, HandshakeError> {
    match connect_steps(stream, identity, secret).await {
        Ok(s) => Ok(s),
        Err(e) => Err(refuse(stream, &identity.cluster, e).await),
    }
}

async fn connect_steps<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    identity: &Identity,
    secret: Option<&ClusterSecret>,
) -> Result<Session, HandshakeError> {
    let cluster = &identity.cluster;
    let (hello, pending) = client_start(identity, secret);
    send_plain(stream, cluster, Message::Hello(hello)).await?;
    let welcome = match recv_plain(stream, cluster).await?.body {
        Message::Welcome(w) => w,
        Message::Reject(r) => return Err(received(r)),
        other => {
            return Err(HandshakeError::Unexpected {
                expected: "welcome",
                got: other.kind(),
            })
        }
    };
    let (proof, session) = client_on_welcome(pending, &welcome)?;
    if let Some(p) = proof {
        send_plain(stream, cluster, Message::Proof(p)).await?;
    }
    Ok(session)
}

/// Runs the server side of the handshake on `stream` (a connection this node accepted).
///
/// Without a secret the server does not wait for a third message, so a client that refuses the
/// server's Welcome (because it has a secret) is seen as a [`Message::Reject`] on the session.
/// No timeout is applied: wrap the call in `tokio::time::timeout`.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    identity: &Identity,
    secret: Option<&ClusterSecret>,
) -> Result<Session, HandshakeError> {
    match accept_steps(stream, identity, secret).await {
        Ok(s) => Ok(s),
        Err(e) => Err(refuse(stream, &identity.cluster, e).await),
    }
}

async fn accept_steps<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    identity: &Identity,
    secret: Option<&ClusterSecret>,
) -> Result<Session, HandshakeError> {
    let cluster = &identity.cluster;
    let env = recv_plain(stream, cluster).await?;
    let hello = match env.body {
        Message::Hello(h) => h,
        Message::Reject(r) => return Err(received(r)),
        other => {
            return Err(HandshakeError::Unexpected {
                expected: "hello",
                got: other.kind(),
            })
        }
    };
    if env.cluster != hello.cluster {
        return Err(HandshakeError::Refused(reject(
            RejectReason::Protocol,
            format!(
                "the envelope names cluster {:?} but the hello names {:?}",
                clip(&env.cluster, ECHO_MAX),
                clip(&hello.cluster, ECHO_MAX)
            ),
        )));
    }
    let (welcome, pending) =
        server_on_hello(identity, secret, &hello).map_err(HandshakeError::Refused)?;
    send_plain(stream, cluster, Message::Welcome(welcome)).await?;
    let proof = if pending.expects_proof() {
        match recv_plain(stream, cluster).await?.body {
            Message::Proof(p) => Some(p),
            Message::Reject(r) => return Err(received(r)),
            other => {
                return Err(HandshakeError::Unexpected {
                    expected: "proof",
                    got: other.kind(),
                })
            }
        }
    } else {
        None
    };
    server_on_proof(pending, proof.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(node: &str) -> Identity {
        Identity::new("prod", node, format!("{node}:7800"))
    }

    fn secret(s: &str) -> Option<ClusterSecret> {
        ClusterSecret::new(s)
    }

    /// Runs the pure handshake; `Err((side, error))`.
    fn run(
        cs: Option<&ClusterSecret>,
        ss: Option<&ClusterSecret>,
    ) -> Result<(Session, Session), (&'static str, HandshakeError)> {
        let (hello, cp) = client_start(&id("a"), cs);
        let (welcome, sp) = server_on_hello(&id("b"), ss, &hello)
            .map_err(|r| ("server", HandshakeError::Refused(r)))?;
        let (proof, client) = client_on_welcome(cp, &welcome).map_err(|e| ("client", e))?;
        let server = server_on_proof(sp, proof.as_ref()).map_err(|e| ("server", e))?;
        Ok((client, server))
    }

    #[test]
    fn secret_is_masked_and_empty_means_none() {
        assert_eq!(
            format!("{:?}", secret("hunter2")),
            "Some(ClusterSecret(***))"
        );
        assert!(ClusterSecret::new("").is_none());
    }

    #[test]
    fn handshake_with_and_without_secret() {
        let (c, s) = run(None, None).unwrap();
        assert!(!c.is_authenticated() && !s.is_authenticated());
        assert_eq!(c.peer.node_id, "b");
        assert_eq!(s.peer.node_id, "a");
        assert_eq!(s.peer.advertised_addr, "a:7800");
        let k = secret("k");
        let (c, s) = run(k.as_ref(), k.as_ref()).unwrap();
        assert!(c.is_authenticated() && s.is_authenticated());
    }

    #[test]
    fn secret_mismatches_are_auth_refusals() {
        let (a, b) = (secret("a"), secret("b"));
        for (cs, ss) in [
            (a.as_ref(), b.as_ref()),
            (a.as_ref(), None),
            (None, b.as_ref()),
        ] {
            let (side, err) = run(cs, ss).unwrap_err();
            assert_eq!(side, "client", "the client sees the server's proof first");
            assert_eq!(err.reason(), Some(&RejectReason::Auth), "{err}");
            assert!(err.reject_to_send().is_some());
        }
    }

    #[test]
    fn server_refuses_a_bad_or_missing_client_proof() {
        let k = secret("k");
        let (hello, cp) = client_start(&id("a"), k.as_ref());
        let (welcome, sp) = server_on_hello(&id("b"), k.as_ref(), &hello).unwrap();
        let (proof, _) = client_on_welcome(cp, &welcome).unwrap();
        let mut bad = proof.unwrap();
        bad.proof.0[0] ^= 1;
        let err = server_on_proof(sp, Some(&bad)).unwrap_err();
        assert_eq!(err.reason(), Some(&RejectReason::Auth));

        let (_, sp) = server_on_hello(&id("b"), k.as_ref(), &hello).unwrap();
        let err = server_on_proof(sp, None).unwrap_err();
        assert_eq!(err.reason(), Some(&RejectReason::Auth));

        let (_, sp) = server_on_hello(&id("b"), None, &hello).unwrap();
        let err = server_on_proof(sp, Some(&bad)).unwrap_err();
        assert_eq!(err.reason(), Some(&RejectReason::Auth));
    }

    #[test]
    fn a_proof_does_not_serve_another_connection_or_role() {
        let k = secret("k");
        let (hello, cp) = client_start(&id("a"), k.as_ref());
        let (welcome1, _) = server_on_hello(&id("b"), k.as_ref(), &hello).unwrap();
        let (proof1, _) = client_on_welcome(cp, &welcome1).unwrap();
        // The same Hello again (a replay by an attacker): the server draws a new nonce.
        let (welcome2, sp2) = server_on_hello(&id("b"), k.as_ref(), &hello).unwrap();
        assert_ne!(welcome1.nonce, welcome2.nonce);
        assert!(server_on_proof(sp2, proof1.as_ref()).is_err());
        // The server's proof is not a valid client proof.
        let (_, sp3) = server_on_hello(&id("b"), k.as_ref(), &hello).unwrap();
        let as_client = Proof {
            proof: welcome1.proof.unwrap(),
        };
        assert!(server_on_proof(sp3, Some(&as_client)).is_err());
    }

    #[test]
    fn identity_checks() {
        let (hello, _) = client_start(&id("a"), None);
        let mut other = id("b");
        other.cluster = "test".into();
        let r = server_on_hello(&other, None, &hello).unwrap_err();
        assert_eq!(
            r.reason,
            RejectReason::ClusterName {
                ours: "test".into(),
                theirs: "prod".into()
            }
        );
        let mut newer = id("b");
        newer.version = "9.9.9".into();
        let r = server_on_hello(&newer, None, &hello).unwrap_err();
        assert_eq!(
            r.reason,
            RejectReason::Version {
                ours: "9.9.9".into(),
                theirs: env!("CARGO_PKG_VERSION").into()
            }
        );
        assert!(r.message.contains("9.9.9") && r.message.contains(env!("CARGO_PKG_VERSION")));
        let r = server_on_hello(&id("a"), None, &hello).unwrap_err();
        assert!(matches!(r.reason, RejectReason::SameNodeId { .. }));
        let mut h = hello.clone();
        h.protocol = 2;
        assert_eq!(
            server_on_hello(&id("b"), None, &h).unwrap_err().reason,
            RejectReason::Protocol
        );
        let mut h = hello.clone();
        h.magic = 0;
        assert_eq!(
            server_on_hello(&id("b"), None, &h).unwrap_err().reason,
            RejectReason::Protocol
        );
        let mut h = hello;
        h.node_id.clear();
        assert_eq!(
            server_on_hello(&id("b"), None, &h).unwrap_err().reason,
            RejectReason::Protocol
        );
    }

    /// The Reject a node sends, framed as it goes on the wire.
    fn framed(r: &Reject) -> Result<Vec<u8>, WireError> {
        Envelope::new("test", Message::Reject(r.clone())).encode()
    }

    #[test]
    fn a_reject_echoing_a_huge_hello_still_fits_in_a_frame() {
        // Quotes double under JSON escaping, and the message quotes the name through `{:?}`
        // once more: a ~44 KB Hello used to produce a ~66 KB Reject, which was never sent.
        for field in [
            "\"".repeat(11_000),
            "\u{1}".repeat(10_000),
            "é".repeat(20_001),
        ] {
            let (mut hello, _) = client_start(&id("a"), None);
            hello.cluster = field.clone();
            let r = server_on_hello(&id("b"), None, &hello).unwrap_err();
            assert!(matches!(r.reason, RejectReason::ClusterName { .. }));
            let frame = framed(&r).expect("the cluster name Reject fits in a frame");
            assert!(frame.len() < 8 * 1024, "{} bytes", frame.len());

            let (mut hello, _) = client_start(&id("a"), None);
            hello.version = field.clone();
            let r = server_on_hello(&id("b"), None, &hello).unwrap_err();
            assert!(matches!(r.reason, RejectReason::Version { .. }));
            assert!(framed(&r).is_ok(), "the version Reject fits in a frame");
            if let RejectReason::Version { theirs, .. } = &r.reason {
                assert!(theirs.len() < ECHO_MAX + 32, "{} bytes", theirs.len());
            }
        }
        // Any error text is bounded, char-boundary safe.
        let r = reject(RejectReason::Protocol, "é".repeat(REJECT_MESSAGE_MAX));
        assert!(r.message.len() < REJECT_MESSAGE_MAX + 32);
        assert!(r.message.starts_with('é') && r.message.ends_with("bytes)"));
        assert_eq!(clip("short", ECHO_MAX), "short");
    }

    #[tokio::test]
    async fn a_huge_hello_gets_its_reject_over_the_stream() {
        let mut big = id("a");
        big.cluster = "\"".repeat(11_000);
        let (mut c, mut s) = tokio::io::duplex(256 * 1024);
        let server = tokio::spawn(async move { accept(&mut s, &id("b"), None).await });
        let client = connect(&mut c, &big, None).await.unwrap_err();
        assert!(
            matches!(client.reason(), Some(RejectReason::ClusterName { .. })),
            "the client got no Reject: {client}"
        );
        assert!(server.await.unwrap().is_err());
    }

    #[test]
    fn client_checks_the_welcome_too() {
        let (hello, cp) = client_start(&id("a"), None);
        let (mut welcome, _) = server_on_hello(&id("b"), None, &hello).unwrap();
        welcome.version = "0.0.0-other".into();
        let err = client_on_welcome(cp, &welcome).unwrap_err();
        assert!(matches!(err.reason(), Some(RejectReason::Version { .. })));
    }

    fn keyed_pair() -> (Session, Session) {
        let k = secret("k");
        run(k.as_ref(), k.as_ref()).unwrap()
    }

    #[test]
    fn sealed_frames_open_in_order_once() {
        let (mut c, mut s) = keyed_pair();
        let f1 = c.sealer.seal(b"{\"a\":1}").unwrap();
        let f2 = c.sealer.seal(b"{\"a\":2}").unwrap();
        assert_eq!(f1.len(), SEAL_OVERHEAD + 7);
        assert_eq!(s.opener.open(&f1).unwrap(), b"{\"a\":1}");
        assert!(matches!(
            s.opener.open(&f1),
            Err(WireError::Replay {
                got: 1,
                expected_above: 1
            })
        ));
        assert_eq!(s.opener.open(&f2).unwrap(), b"{\"a\":2}");
        assert_eq!(s.opener.last_seq(), 2);
        // The other way round works too, with its own counter.
        let back = s.sealer.seal(b"{}").unwrap();
        assert_eq!(c.opener.open(&back).unwrap(), b"{}");
    }

    #[test]
    fn gaps_tampering_reflection_and_truncation_are_refused() {
        let (mut c, mut s) = keyed_pair();
        let _lost = c.sealer.seal(b"1").unwrap();
        let f2 = c.sealer.seal(b"2").unwrap();
        assert!(matches!(
            s.opener.open(&f2),
            Err(WireError::SeqGap {
                got: 2,
                expected: 1
            })
        ));
        let mut t = f2.clone();
        *t.last_mut().unwrap() ^= 1;
        assert!(matches!(s.opener.open(&t), Err(WireError::BadMac)));
        let mut t = f2.clone();
        t[TAG_LEN + 7] = 1; // claim seq 1: the MAC no longer matches
        assert!(matches!(s.opener.open(&t), Err(WireError::BadMac)));
        assert!(matches!(c.opener.open(&f2), Err(WireError::BadMac)));
        assert!(matches!(
            s.opener.open(&f2[..39]),
            Err(WireError::Truncated)
        ));
        assert!(matches!(s.opener.open(b"{}"), Err(WireError::Truncated)));
        assert_eq!(s.opener.last_seq(), 0, "nothing was accepted");
    }

    #[test]
    fn sessions_of_another_handshake_do_not_open_each_others_frames() {
        let (mut c1, _) = keyed_pair();
        let (_, mut s2) = keyed_pair();
        let f = c1.sealer.seal(b"{}").unwrap();
        assert!(matches!(s2.opener.open(&f), Err(WireError::BadMac)));
    }

    #[test]
    fn plain_sessions_pass_json_through() {
        let (mut c, mut s) = run(None, None).unwrap();
        let f = c.sealer.seal(b"{}").unwrap();
        assert_eq!(f, b"{}");
        assert_eq!(s.opener.open(&f).unwrap(), b"{}");
        assert!(matches!(s.opener.open(b""), Err(WireError::Empty)));
        assert!(matches!(c.sealer.seal(b""), Err(WireError::Empty)));
    }

    #[test]
    fn seal_respects_the_frame_limit() {
        let (mut c, _) = keyed_pair();
        let max_json = vec![b'x'; MAX_FRAME - SEAL_OVERHEAD];
        assert_eq!(c.sealer.seal(&max_json).unwrap().len(), MAX_FRAME);
        assert!(matches!(
            c.sealer.seal(&[b'x'; MAX_FRAME - SEAL_OVERHEAD + 1]),
            Err(WireError::TooLarge { .. })
        ));
        assert_eq!(
            c.sealer.last_seq(),
            1,
            "a refused frame uses no sequence number"
        );
    }
}
