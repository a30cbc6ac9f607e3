//! The cluster channel's wire format: length-prefixed frames carrying JSON [`Envelope`]s.
//!
//! # Frames
//! A frame is a `u32` big-endian payload length followed by that many payload bytes. The length is
//! checked against the caller's limit (normally [`MAX_FRAME`]) **before** any buffer is allocated,
//! and a zero length is refused: a header claiming 4 GiB costs the reader four bytes, not 4 GiB.
//!
//! # Envelopes
//! Every payload is (after the session layer of [`super::auth`] has removed its MAC) one JSON
//! [`Envelope`]: the magic number [`MAGIC`], the protocol version [`PROTOCOL`], the cluster name and
//! the [`Message`]. [`Envelope::decode`] checks them in that order and says which one failed, so a
//! node that reached a foreign service, an older release or the wrong cluster logs exactly that.
//!
//! # Guarantees
//! Every decoder here ([`decode_frame_header`], [`decode_frame`], [`read_frame`],
//! [`Envelope::decode`], [`Envelope::peek_header`]) is total: any input yields a value or a
//! [`WireError`], never a panic, and never allocates more than the size limit allows.

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::cache::Change;

/// Magic number on every envelope: `"OFC1"` in ASCII (`0x4F464331`).
pub const MAGIC: u32 = 0x4F46_4331;

/// Protocol version on every envelope. A node refuses envelopes of any other version.
pub const PROTOCOL: u16 = 1;

/// Largest frame payload, in bytes (64 KiB), MAC included.
pub const MAX_FRAME: usize = 64 * 1024;

/// Size of a frame header: the `u32` big-endian payload length.
pub const FRAME_HEADER_LEN: usize = 4;

/// Length in bytes of a handshake nonce.
pub const NONCE_LEN: usize = 32;

/// Length in bytes of an HMAC-SHA256 tag (proofs and frame MACs).
pub const TAG_LEN: usize = 32;

/// Why bytes from a peer could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A frame (or message) is longer than the limit. Nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The length claimed or found.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame or message of zero bytes.
    #[error("empty frame")]
    Empty,
    /// The input ended inside a frame header, a frame, or a sealed frame's MAC and sequence number.
    #[error("truncated frame")]
    Truncated,
    /// The peer closed the stream cleanly between two frames.
    #[error("connection closed by the peer")]
    Closed,
    /// The envelope does not start with [`MAGIC`]: the peer is not an openfhir-cache node.
    #[error(
        "bad magic number {got:#010x} (expected {MAGIC:#010x}): not an openfhir-cache cluster peer"
    )]
    BadMagic {
        /// The magic number received.
        got: u32,
    },
    /// The envelope's protocol version is not [`PROTOCOL`].
    #[error("unsupported cluster protocol version {got} (this node speaks {PROTOCOL})")]
    UnsupportedProtocol {
        /// The version received.
        got: u16,
    },
    /// The envelope names another cluster.
    #[error("message for cluster {theirs:?}, but this node is in cluster {ours:?}")]
    WrongCluster {
        /// This node's cluster name.
        ours: String,
        /// The cluster name in the message.
        theirs: String,
    },
    /// The payload is not a valid envelope (bad JSON, unknown message type, unknown field, bad hex).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A sealed frame's MAC does not match: tampered, reflected, or sealed with another key.
    #[error("frame authentication failed (bad MAC)")]
    BadMac,
    /// An authentic frame whose sequence number was already used: a replay.
    #[error("replayed frame: sequence number {got}, expected above {expected_above}")]
    Replay {
        /// The sequence number received.
        got: u64,
        /// The last sequence number accepted.
        expected_above: u64,
    },
    /// An authentic frame that skips sequence numbers: frames were dropped in between.
    #[error("frames missing: sequence number {got}, expected {expected}")]
    SeqGap {
        /// The sequence number received.
        got: u64,
        /// The next sequence number expected.
        expected: u64,
    },
    /// The sender used up its sequence numbers (2^64 frames); the session must be re-established.
    #[error("sequence numbers exhausted; reconnect")]
    SeqExhausted,
    /// Reading or writing the stream failed.
    #[error("cluster connection I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl WireError {
    /// True when the peer went away ([`WireError::Closed`], [`WireError::Truncated`], or an I/O
    /// error such as a reset): the connection is over, but nothing was forged.
    pub fn is_closed(&self) -> bool {
        match self {
            WireError::Closed | WireError::Truncated => true,
            WireError::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }

    /// True when the peer sent something forged or replayed ([`WireError::BadMac`],
    /// [`WireError::Replay`], [`WireError::SeqGap`]): worth a warning, and the connection must be
    /// dropped.
    pub fn is_security(&self) -> bool {
        matches!(
            self,
            WireError::BadMac | WireError::Replay { .. } | WireError::SeqGap { .. }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Frames

/// Frames `payload`: its `u32` big-endian length, then the bytes.
///
/// Fails with [`WireError::Empty`] or [`WireError::TooLarge`] (over [`MAX_FRAME`]) rather than
/// produce a frame every peer would refuse.
pub fn encode_frame(payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let len = check_len(payload.len(), MAX_FRAME)?;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Reads a frame header from the first [`FRAME_HEADER_LEN`] bytes of `header` and returns the
/// payload length, refused if 0 ([`WireError::Empty`]) or above `max` ([`WireError::TooLarge`]).
pub fn decode_frame_header(header: &[u8], max: usize) -> Result<usize, WireError> {
    let Some(bytes) = header.first_chunk::<FRAME_HEADER_LEN>() else {
        return Err(WireError::Truncated);
    };
    let len = u32::from_be_bytes(*bytes) as usize;
    check_len(len, max)?;
    Ok(len)
}

/// Splits one complete frame off the front of `buf`: `(payload, rest)`.
///
/// [`WireError::Truncated`] when `buf` holds less than a whole frame.
pub fn decode_frame(buf: &[u8], max: usize) -> Result<(&[u8], &[u8]), WireError> {
    let len = decode_frame_header(buf, max)?;
    let body = &buf[FRAME_HEADER_LEN..];
    if body.len() < len {
        return Err(WireError::Truncated);
    }
    Ok(body.split_at(len))
}

/// Reads one frame and returns its payload.
///
/// The length is checked against `max` before the payload buffer is allocated. A stream that ends
/// exactly between two frames gives [`WireError::Closed`]; one that ends inside a frame gives
/// [`WireError::Truncated`].
///
/// # Cancel safety
/// Not cancel safe: a cancelled read may leave the stream in the middle of a frame. Wrap the whole
/// connection, not a single read, in a timeout.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Vec<u8>, WireError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut filled = 0;
    while filled < FRAME_HEADER_LEN {
        let n = r.read(&mut header[filled..]).await?;
        if n == 0 {
            return Err(if filled == 0 {
                WireError::Closed
            } else {
                WireError::Truncated
            });
        }
        filled += n;
    }
    let len = decode_frame_header(&header, max)?;
    let mut payload = vec![0u8; len];
    match r.read_exact(&mut payload).await {
        Ok(_) => Ok(payload),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Reads frames through a buffer: one read usually brings a whole frame (header and payload, or
/// several frames), where [`read_frame`] needs at least two.
///
/// The length is checked against the limit before room for the payload is reserved, as in
/// [`read_frame`], so a header claiming 4 GiB costs four bytes.
///
/// # Cancel safety
/// [`FrameReader::next`] is cancel safe: bytes read before a cancellation stay in the buffer and
/// the next call continues with them. Race it against a timer freely.
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    max: usize,
}

/// Room reserved for each read: several small frames, in one system call.
const READ_CHUNK: usize = 8 * 1024;

impl FrameReader {
    /// A reader of frames of at most `max` payload bytes.
    pub fn new(max: usize) -> FrameReader {
        FrameReader {
            buf: BytesMut::new(),
            max,
        }
    }

    /// The next frame's payload. A stream that ends exactly between two frames gives
    /// [`WireError::Closed`]; one that ends inside a frame gives [`WireError::Truncated`].
    pub async fn next<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Bytes, WireError> {
        loop {
            let mut want = READ_CHUNK;
            if self.buf.len() >= FRAME_HEADER_LEN {
                let len = decode_frame_header(&self.buf, self.max)?;
                let total = FRAME_HEADER_LEN + len;
                if self.buf.len() >= total {
                    let mut frame = self.buf.split_to(total);
                    frame.advance(FRAME_HEADER_LEN);
                    return Ok(frame.freeze());
                }
                want = want.max(total - self.buf.len());
            }
            self.buf.reserve(want);
            if r.read_buf(&mut self.buf).await? == 0 {
                return Err(if self.buf.is_empty() {
                    WireError::Closed
                } else {
                    WireError::Truncated
                });
            }
        }
    }
}

/// Writes `payload` as one frame and flushes.
///
/// Refuses (without writing anything) an empty payload or one over [`MAX_FRAME`].
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
) -> Result<(), WireError> {
    let len = check_len(payload.len(), MAX_FRAME)?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(payload).await?;
    w.flush().await?;
    Ok(())
}

fn check_len(len: usize, max: usize) -> Result<u32, WireError> {
    if len == 0 {
        return Err(WireError::Empty);
    }
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    u32::try_from(len).map_err(|_| WireError::TooLarge {
        len,
        max: u32::MAX as usize,
    })
}

fn check_magic_and_protocol(magic: u32, protocol: u16) -> Result<(), WireError> {
    if magic != MAGIC {
        return Err(WireError::BadMagic { got: magic });
    }
    if protocol != PROTOCOL {
        return Err(WireError::UnsupportedProtocol { got: protocol });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Nonces and tags

/// A 32-byte handshake nonce, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Nonce(pub [u8; NONCE_LEN]);

impl Nonce {
    /// A fresh nonce from the operating system's random source.
    ///
    /// # Panics
    /// Only if the operating system provides no randomness at all; no handshake can be secure
    /// without it.
    pub fn random() -> Nonce {
        let mut bytes = [0u8; NONCE_LEN];
        getrandom::fill(&mut bytes).expect("the operating system's random source failed");
        Nonce(bytes)
    }
}

/// An HMAC-SHA256 tag (a handshake proof), written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(pub [u8; TAG_LEN]);

macro_rules! hex_newtype {
    ($t:ident, $n:expr, $what:literal) => {
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({})"), to_hex(&self.0))
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&to_hex(&self.0))
            }
        }
        impl std::str::FromStr for $t {
            type Err = WireError;
            fn from_str(s: &str) -> Result<Self, WireError> {
                from_hex::<$n>(s).map($t).ok_or_else(|| {
                    WireError::Malformed(format!(
                        concat!($what, " must be {} hex digits, got {:?}"),
                        2 * $n,
                        truncate(s, 80)
                    ))
                })
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&to_hex(&self.0))
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
hex_newtype!(Nonce, NONCE_LEN, "a nonce");
hex_newtype!(Tag, TAG_LEN, "a proof");

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

// ---------------------------------------------------------------------------------------------
// Messages

/// The client's first message: who it is, and its nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// [`MAGIC`].
    pub magic: u32,
    /// [`PROTOCOL`].
    pub protocol: u16,
    /// The client's cluster name.
    pub cluster: String,
    /// The client's node id.
    pub node_id: String,
    /// The client's release (`CARGO_PKG_VERSION`); must equal the server's.
    pub version: String,
    /// The `host:port` where the client's own cluster channel listens.
    pub advertised_addr: String,
    /// The client's handshake nonce.
    pub nonce: Nonce,
}

/// The server's answer to an acceptable [`Hello`]: who it is, its nonce and, with a cluster
/// secret, its proof of the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Welcome {
    /// [`MAGIC`].
    pub magic: u32,
    /// [`PROTOCOL`].
    pub protocol: u16,
    /// The server's cluster name.
    pub cluster: String,
    /// The server's node id.
    pub node_id: String,
    /// The server's release.
    pub version: String,
    /// The `host:port` where the server's cluster channel listens.
    pub advertised_addr: String,
    /// The server's handshake nonce.
    pub nonce: Nonce,
    /// `HMAC(secret, "server" || nonce_c || nonce_s || server node_id)`; `None` without a secret.
    pub proof: Option<Tag>,
}

/// Why a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum RejectReason {
    /// The peers are configured with different cluster names.
    ClusterName {
        /// The refusing node's cluster name.
        ours: String,
        /// The refused node's cluster name.
        theirs: String,
    },
    /// The peers run different releases; mixed-version clusters are not supported.
    Version {
        /// The refusing node's release.
        ours: String,
        /// The refused node's release.
        theirs: String,
    },
    /// The cluster secret check failed: a wrong proof, or a secret on one side only.
    Auth,
    /// The peer broke the protocol: bad magic, another protocol version, an unexpected message.
    Protocol,
    /// The peer has this node's own node id: a node connected to itself, or two nodes share an id.
    SameNodeId {
        /// The node id both ends have.
        node_id: String,
    },
}

/// A refusal, sent instead of the next handshake message; the connection is closed after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{message}")]
pub struct Reject {
    /// The machine-readable reason.
    pub reason: RejectReason,
    /// A sentence for the logs of both nodes.
    pub message: String,
}

/// The client's proof of the cluster secret, sent after a [`Welcome`] that carried one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proof {
    /// `HMAC(secret, "client" || nonce_s || nonce_c || client node_id)`.
    pub proof: Tag,
}

/// A change committed through the origin node: evict what it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invalidate {
    /// The node id of the node that made the change.
    pub origin: String,
    /// The origin's broadcast sequence number, increasing by one per message it originates.
    pub seq: u64,
    /// The change's position in `openfhir_invalidation_log`, when known.
    pub log_position: Option<i64>,
    /// What changed; applied through [`crate::cache::targets`].
    pub change: Change,
}

/// "I am alive", with the origin's latest broadcast sequence number so gaps can be detected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The sending node's id.
    pub origin: String,
    /// The last [`Invalidate::seq`] the origin sent.
    pub seq: u64,
    /// The origin's wall clock, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// The origin is shutting down cleanly: drop it from membership at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Leave {
    /// The leaving node's id.
    pub origin: String,
}

/// Every message of the cluster channel. JSON: an object with `"type"` naming the variant in
/// snake case (`"hello"`, `"invalidate"`, ...) beside the variant's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Message {
    /// Handshake, client to server.
    Hello(Hello),
    /// Handshake, server to client.
    Welcome(Welcome),
    /// Handshake refusal, either way.
    Reject(Reject),
    /// Handshake, client to server, with a cluster secret only.
    Proof(Proof),
    /// A change to apply.
    Invalidate(Invalidate),
    /// Liveness.
    Heartbeat(Heartbeat),
    /// Clean shutdown.
    Leave(Leave),
}

impl Message {
    /// The variant's name as on the wire (`"hello"`, ...), for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Reject(_) => "reject",
            Message::Proof(_) => "proof",
            Message::Invalidate(_) => "invalidate",
            Message::Heartbeat(_) => "heartbeat",
            Message::Leave(_) => "leave",
        }
    }
}

/// What wraps every message: magic number, protocol version and cluster name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// [`MAGIC`].
    pub magic: u32,
    /// [`PROTOCOL`].
    pub protocol: u16,
    /// The sender's cluster name.
    pub cluster: String,
    /// The message.
    pub body: Message,
}

/// The fields every protocol version keeps: read first, so an envelope of another version (whose
/// body this release cannot parse) is still reported as [`WireError::UnsupportedProtocol`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EnvelopeHeader {
    /// The magic number.
    pub magic: u32,
    /// The protocol version.
    pub protocol: u16,
    /// The cluster name.
    pub cluster: String,
}

impl Envelope {
    /// `body` for cluster `cluster`, with this release's [`MAGIC`] and [`PROTOCOL`].
    pub fn new(cluster: impl Into<String>, body: Message) -> Envelope {
        Envelope {
            magic: MAGIC,
            protocol: PROTOCOL,
            cluster: cluster.into(),
            body,
        }
    }

    /// The envelope as JSON bytes, refused if longer than [`MAX_FRAME`].
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let bytes = serde_json::to_vec(self).map_err(|e| WireError::Malformed(e.to_string()))?;
        check_len(bytes.len(), MAX_FRAME)?;
        Ok(bytes)
    }

    /// Reads only magic, protocol and cluster (see [`EnvelopeHeader`]), checking the size first.
    pub fn peek_header(bytes: &[u8]) -> Result<EnvelopeHeader, WireError> {
        check_len(bytes.len(), MAX_FRAME)?;
        serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))
    }

    /// Decodes an envelope sent to cluster `cluster`, checking in this order: size
    /// ([`WireError::Empty`], [`WireError::TooLarge`]), magic ([`WireError::BadMagic`]), protocol
    /// ([`WireError::UnsupportedProtocol`]), the message itself ([`WireError::Malformed`]), and the
    /// cluster name ([`WireError::WrongCluster`]).
    ///
    /// The cluster name of a [`Message::Hello`] or [`Message::Reject`] is not checked here: the
    /// handshake checks the Hello's and answers with a [`RejectReason::ClusterName`] that names
    /// both clusters, and a Reject is accepted from any cluster so the refused node can log why.
    pub fn decode(bytes: &[u8], cluster: &str) -> Result<Envelope, WireError> {
        check_len(bytes.len(), MAX_FRAME)?;
        // One parse for a well-formed envelope (every frame of a healthy peer); only when it
        // fails is the header read on its own, so that a foreign service or another release is
        // named as such rather than as malformed. Both orders give the same answer.
        let env: Envelope = match serde_json::from_slice(bytes) {
            Ok(env) => env,
            Err(e) => {
                let header = Envelope::peek_header(bytes)?;
                check_magic_and_protocol(header.magic, header.protocol)?;
                return Err(WireError::Malformed(e.to_string()));
            }
        };
        check_magic_and_protocol(env.magic, env.protocol)?;
        let exempt = matches!(env.body, Message::Hello(_) | Message::Reject(_));
        if !exempt && env.cluster != cluster {
            return Err(WireError::WrongCluster {
                ours: cluster.to_string(),
                theirs: env.cluster,
            });
        }
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            magic: MAGIC,
            protocol: PROTOCOL,
            cluster: "prod".into(),
            node_id: "n1".into(),
            version: "0.1.0".into(),
            advertised_addr: "10.0.0.1:7800".into(),
            nonce: Nonce([7; 32]),
        }
    }

    fn invalidate() -> Message {
        Message::Invalidate(Invalidate {
            origin: "n1".into(),
            seq: 42,
            log_position: Some(9),
            change: Change::Opt {
                tenant: "default".into(),
                template_id: "growth_chart".into(),
            },
        })
    }

    #[test]
    fn magic_is_ofc1() {
        assert_eq!(&MAGIC.to_be_bytes(), b"OFC1");
    }

    #[test]
    fn envelope_round_trips_every_message() {
        let bodies = vec![
            Message::Hello(hello()),
            Message::Welcome(Welcome {
                magic: MAGIC,
                protocol: PROTOCOL,
                cluster: "prod".into(),
                node_id: "n2".into(),
                version: "0.1.0".into(),
                advertised_addr: "[::1]:7800".into(),
                nonce: Nonce([1; 32]),
                proof: Some(Tag([2; 32])),
            }),
            Message::Reject(Reject {
                reason: RejectReason::Version {
                    ours: "0.1.0".into(),
                    theirs: "0.2.0".into(),
                },
                message: "no".into(),
            }),
            Message::Proof(Proof {
                proof: Tag([3; 32]),
            }),
            invalidate(),
            Message::Heartbeat(Heartbeat {
                origin: "n1".into(),
                seq: 1,
                at_unix_ms: 1_700_000_000_000,
            }),
            Message::Leave(Leave {
                origin: "n1".into(),
            }),
        ];
        for body in bodies {
            let env = Envelope::new("prod", body);
            let bytes = env.encode().unwrap();
            assert_eq!(Envelope::decode(&bytes, "prod").unwrap(), env);
        }
    }

    #[test]
    fn json_shape_is_tagged_snake_case_with_hex_nonce() {
        let v: serde_json::Value = serde_json::from_slice(
            &Envelope::new("prod", Message::Hello(hello()))
                .encode()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(v["magic"], 0x4F46_4331);
        assert_eq!(v["protocol"], 1);
        assert_eq!(v["body"]["type"], "hello");
        assert_eq!(v["body"]["nonce"], "07".repeat(32));
        let v = serde_json::to_value(invalidate()).unwrap();
        assert_eq!(v["type"], "invalidate");
        assert_eq!(v["change"]["kind"], "opt");
    }

    #[test]
    fn decode_checks_magic_then_protocol_then_cluster() {
        let good = Envelope::new("prod", invalidate());
        let mut v = serde_json::to_value(&good).unwrap();
        v["magic"] = 1.into();
        v["protocol"] = 9.into(); // magic is reported first
        let err = Envelope::decode(&serde_json::to_vec(&v).unwrap(), "prod").unwrap_err();
        assert!(matches!(err, WireError::BadMagic { got: 1 }), "{err}");

        v["magic"] = MAGIC.into();
        v["body"] = serde_json::json!({"type": "from_the_future"});
        let err = Envelope::decode(&serde_json::to_vec(&v).unwrap(), "prod").unwrap_err();
        assert!(
            matches!(err, WireError::UnsupportedProtocol { got: 9 }),
            "{err}"
        );

        let err = Envelope::decode(&good.encode().unwrap(), "test").unwrap_err();
        match err {
            WireError::WrongCluster { ours, theirs } => {
                assert_eq!((ours.as_str(), theirs.as_str()), ("test", "prod"))
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn hello_and_reject_pass_the_cluster_check() {
        let env = Envelope::new("other", Message::Hello(hello()));
        assert!(Envelope::decode(&env.encode().unwrap(), "prod").is_ok());
        let env = Envelope::new(
            "other",
            Message::Reject(Reject {
                reason: RejectReason::Auth,
                message: "x".into(),
            }),
        );
        assert!(Envelope::decode(&env.encode().unwrap(), "prod").is_ok());
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let mut v = serde_json::to_value(Envelope::new("prod", invalidate())).unwrap();
        v["body"]["extra"] = 1.into();
        let unknown_field = serde_json::to_vec(&v).unwrap();
        let mut v = serde_json::to_value(Envelope::new("prod", Message::Hello(hello()))).unwrap();
        v["body"]["nonce"] = "abc".into();
        let short_nonce = serde_json::to_vec(&v).unwrap();
        for bad in [
            &b"not json"[..],
            b"{}",
            b"[1,2,3]",
            br#"{"magic":1330004785,"protocol":1,"cluster":"prod"}"#,
            br#"{"magic":1330004785,"protocol":1,"cluster":"prod","body":{"type":"nope"}}"#,
            &unknown_field,
            &short_nonce,
        ] {
            let err = Envelope::decode(bad, "prod").unwrap_err();
            assert!(matches!(err, WireError::Malformed(_)), "{err}");
        }
        assert!(matches!(
            Envelope::decode(b"", "prod"),
            Err(WireError::Empty)
        ));
        let huge = vec![b' '; MAX_FRAME + 1];
        assert!(matches!(
            Envelope::decode(&huge, "prod"),
            Err(WireError::TooLarge { len, max: MAX_FRAME }) if len == MAX_FRAME + 1
        ));
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
        let mut s = "[".repeat(30_000);
        s.push_str(&"]".repeat(30_000));
        assert!(matches!(
            Envelope::decode(s.as_bytes(), "prod"),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn hex_accepts_either_case_and_rejects_the_rest() {
        assert_eq!("AB".repeat(32).parse::<Nonce>().unwrap(), Nonce([0xab; 32]));
        for bad in ["", "zz", &"a".repeat(63), &"a".repeat(66), &"é".repeat(32)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad}");
        }
        assert_eq!(Tag([0x0f; 32]).to_string(), "0f".repeat(32));
    }

    #[test]
    fn frame_helpers() {
        let f = encode_frame(b"abc").unwrap();
        assert_eq!(f, [0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(decode_frame_header(&f, MAX_FRAME).unwrap(), 3);
        let mut two = f.clone();
        two.extend_from_slice(&f);
        let (p, rest) = decode_frame(&two, MAX_FRAME).unwrap();
        assert_eq!((p, rest), (&b"abc"[..], &f[..]));
        assert!(matches!(
            decode_frame(&f[..5], MAX_FRAME),
            Err(WireError::Truncated)
        ));
        assert!(matches!(
            decode_frame_header(&f[..3], MAX_FRAME),
            Err(WireError::Truncated)
        ));
        assert!(matches!(
            decode_frame_header(&[0; 4], MAX_FRAME),
            Err(WireError::Empty)
        ));
        assert!(matches!(
            decode_frame_header(&[0xff; 4], MAX_FRAME),
            Err(WireError::TooLarge {
                len: 0xffff_ffff,
                max: MAX_FRAME
            })
        ));
        assert!(matches!(encode_frame(b""), Err(WireError::Empty)));
        assert!(matches!(
            encode_frame(&vec![0; MAX_FRAME + 1]),
            Err(WireError::TooLarge { .. })
        ));
        assert!(encode_frame(&vec![0; MAX_FRAME]).is_ok());
    }

    #[tokio::test]
    async fn read_and_write_frames() {
        // A 1 KiB pipe: the 5000-byte frame arrives in pieces while the writer is still writing.
        let (mut a, mut b) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            write_frame(&mut a, b"one").await.unwrap();
            write_frame(&mut a, &vec![9; 5000]).await.unwrap();
            assert!(matches!(
                write_frame(&mut a, b"").await,
                Err(WireError::Empty)
            ));
        });
        assert_eq!(read_frame(&mut b, MAX_FRAME).await.unwrap(), b"one");
        assert_eq!(read_frame(&mut b, MAX_FRAME).await.unwrap(), vec![9; 5000]);
        writer.await.unwrap();
        assert!(matches!(
            read_frame(&mut b, MAX_FRAME).await,
            Err(WireError::Closed)
        ));
    }

    #[tokio::test]
    async fn read_frame_reports_truncation_and_limits() {
        let mut r: &[u8] = &[0, 0];
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME).await,
            Err(WireError::Truncated)
        ));
        let mut r: &[u8] = &[0, 0, 0, 5, 1, 2];
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME).await,
            Err(WireError::Truncated)
        ));
        let mut r: &[u8] = &[0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME).await,
            Err(WireError::Empty)
        ));
        let mut r: &[u8] = &[0, 0, 0, 11, 0];
        assert!(matches!(
            read_frame(&mut r, 10).await,
            Err(WireError::TooLarge { len: 11, max: 10 })
        ));
    }

    #[tokio::test]
    async fn the_frame_reader_reads_several_frames_and_pieces_alike() {
        // Two frames in one write, then one split across writes.
        let (mut a, mut b) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            let mut both = encode_frame(b"one").unwrap();
            both.extend(encode_frame(b"two").unwrap());
            a.write_all(&both).await.unwrap();
            write_frame(&mut a, &vec![9; 5000]).await.unwrap();
        });
        let mut frames = FrameReader::new(MAX_FRAME);
        assert_eq!(&frames.next(&mut b).await.unwrap()[..], b"one");
        assert_eq!(&frames.next(&mut b).await.unwrap()[..], b"two");
        assert_eq!(&frames.next(&mut b).await.unwrap()[..], &[9; 5000][..]);
        writer.await.unwrap();
        assert!(matches!(frames.next(&mut b).await, Err(WireError::Closed)));
    }

    #[tokio::test]
    async fn the_frame_reader_is_cancel_safe() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let mut frames = FrameReader::new(MAX_FRAME);
        // Half a frame, then the read is abandoned (as when the idle timer wins the race).
        let frame = encode_frame(b"whole").unwrap();
        a.write_all(&frame[..6]).await.unwrap();
        let abandoned =
            tokio::time::timeout(std::time::Duration::from_millis(20), frames.next(&mut b)).await;
        assert!(abandoned.is_err());
        a.write_all(&frame[6..]).await.unwrap();
        assert_eq!(&frames.next(&mut b).await.unwrap()[..], b"whole");
    }

    #[tokio::test]
    async fn the_frame_reader_reports_truncation_and_limits_like_read_frame() {
        let reader = || FrameReader::new(MAX_FRAME);
        let mut r: &[u8] = &[0, 0];
        assert!(matches!(
            reader().next(&mut r).await,
            Err(WireError::Truncated)
        ));
        let mut r: &[u8] = &[0, 0, 0, 5, 1, 2];
        assert!(matches!(
            reader().next(&mut r).await,
            Err(WireError::Truncated)
        ));
        let mut r: &[u8] = &[0, 0, 0, 0];
        assert!(matches!(reader().next(&mut r).await, Err(WireError::Empty)));
        // Refused from the header alone: nothing reserved for the claimed 4 GiB.
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0];
        assert!(matches!(
            reader().next(&mut r).await,
            Err(WireError::TooLarge { .. })
        ));
        let mut r: &[u8] = &[0, 0, 0, 11, 0];
        assert!(matches!(
            FrameReader::new(10).next(&mut r).await,
            Err(WireError::TooLarge { len: 11, max: 10 })
        ));
    }

    #[test]
    fn error_classification() {
        assert!(WireError::Closed.is_closed());
        assert!(WireError::BadMac.is_security());
        assert!(!WireError::Empty.is_closed());
        assert!(!WireError::Empty.is_security());
    }
}
