//! The cluster channel's wire format: length-prefixed frames carrying JSON [`Envelope`]s during
//! the handshake and compact binary messages after it.
//!
//! # Frames
//! A frame is a `u32` big-endian payload length followed by that many payload bytes. The length is
//! checked against the caller's limit (normally [`MAX_FRAME`]) **before** any buffer is allocated,
//! and a zero length is refused: a header claiming 4 GiB costs the reader four bytes, not 4 GiB.
//!
//! # Envelopes (the handshake)
//! Every handshake payload is one JSON [`Envelope`]: the magic number [`MAGIC`], the protocol
//! version [`PROTOCOL`], the cluster name and the [`Message`]. [`Envelope::decode`] checks them in
//! that order and says which one failed, so a node that reached a foreign service, an older
//! release or the wrong cluster logs exactly that.
//!
//! # Session messages (after the handshake)
//! Once the handshake has settled the magic number, the protocol and the cluster name, every frame
//! payload (after the session layer of [`super::session`] has opened it) is one [`Invalidate`],
//! [`Heartbeat`] or [`Leave`] in the compact binary form of [`encode_body`] and [`decode_body`]:
//! an invalidation is about 60 bytes instead of about 200 of JSON, and decodes without a parser.
//!
//! # Guarantees
//! Every decoder here ([`decode_frame_header`], [`decode_frame`], [`read_frame`],
//! [`Envelope::decode`], [`Envelope::peek_header`], [`decode_body`]) is total: any input yields a value or a
//! [`WireError`], never a panic, and never allocates more than the size limit allows.
//!
//! # Layout
//! * `frame`: frames, their size limit, and reading and writing them.
//! * `hex`: the [`Tag`] and [`Sealed`] byte strings and their hex form.
//! * `message`: the [`Message`] variants.
//! * `envelope`: the [`Envelope`] around every handshake message, and its checks.
//! * `binary`: the binary form of the session messages.
//! * this module: the constants and [`WireError`].

mod binary;
mod envelope;
mod frame;
mod hex;
mod message;

pub use binary::{decode_body, encode_body, encode_invalidate};
pub use envelope::{Envelope, EnvelopeHeader};
pub use frame::{
    decode_frame, decode_frame_header, encode_frame, read_frame, write_frame, FrameReader,
};
pub use hex::{Sealed, Tag};
pub use message::{
    Card, Confirm, Heartbeat, Hello, Invalidate, Leave, Message, Reject, RejectReason, Welcome,
    MAX_GOSSIP,
};

/// Magic number on every envelope: `"OFC1"` in ASCII (`0x4F464331`).
pub const MAGIC: u32 = 0x4F46_4331;

/// Protocol version on every envelope. A node refuses envelopes of any other version.
/// Version 2: the Noise handshake and encrypted frames with a cluster secret. Version 3: the
/// messages after the handshake in binary ([`encode_body`]) instead of JSON envelopes.
pub const PROTOCOL: u16 = 3;

/// Largest frame payload, in bytes (64 KiB), the session layer's tag included.
pub const MAX_FRAME: usize = 64 * 1024;

/// Size of a frame header: the `u32` big-endian payload length.
pub const FRAME_HEADER_LEN: usize = 4;

/// Length in bytes of an HMAC-SHA256 tag (multicast announcements).
pub const TAG_LEN: usize = 32;

/// Largest Noise handshake message in a [`Hello`] or [`Welcome`], in bytes: an ephemeral key,
/// a tag and a card, with room to spare.
pub const SEALED_MAX: usize = 1024;

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
    /// The input ended inside a frame header, a frame, or a sealed frame's tag.
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
    /// A sealed frame did not open: forged, tampered with, replayed, reordered, reflected, or
    /// sealed in another session. (The Noise nonce is the frame's position, so any of these fails
    /// the same authentication check.)
    #[error("frame authentication failed: forged, replayed, reordered or from another session")]
    BadMac,
    /// The sender used up its nonces (2^64 frames); the session must be re-established.
    #[error("session nonces exhausted; reconnect")]
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

    /// True when the peer sent something forged or replayed ([`WireError::BadMac`]): worth a
    /// warning, and the connection must be dropped.
    pub fn is_security(&self) -> bool {
        matches!(self, WireError::BadMac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_is_ofc1() {
        assert_eq!(&MAGIC.to_be_bytes(), b"OFC1");
    }

    #[test]
    fn error_classification() {
        assert!(WireError::Closed.is_closed());
        assert!(WireError::BadMac.is_security());
        assert!(!WireError::Empty.is_closed());
        assert!(!WireError::Empty.is_security());
    }
}
