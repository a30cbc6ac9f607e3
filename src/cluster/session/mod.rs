//! The handshake and the session layer: who the peer is, whether it holds the cluster secret, and
//! the encryption of every frame after that.
//!
//! # Handshake
//! ```text
//! client                                              server
//!   Hello { cluster, version, card | noise: -> psk, e }      ->
//!                                 <-   Welcome { cluster, version, card | noise: <- e, ee }
//!                                      (or Reject { reason, message })
//!   sealed Confirm            (only with a secret)           ->
//!   (or Reject { reason, message })
//! ```
//! Both sides check the magic number, the protocol version, the cluster name and the release in
//! clear, so nodes that disagree on them are refused with that reason even when their secrets
//! differ too. Each side then learns the other's [`Card`] (node id and advertised address), checks
//! the node id ([`check_node_id`]) and refuses a peer with its own id.
//!
//! With a `CLUSTER_SECRET` ([`ClusterSecret`]) the handshake is Noise `NNpsk0` over X25519,
//! ChaCha20-Poly1305 and BLAKE2s ([`NOISE_PARAMS`], the `snow` crate): the pre-shared key derived
//! from the secret authenticates both sides, fresh ephemeral keys on both sides give every session
//! its own keys, and those keys die with the session (forward secrecy: a secret that leaks later
//! does not decrypt recorded traffic). The cards travel inside the Noise messages, so node ids
//! and addresses are not in clear either. The cleartext fields are the Noise prologue: changing
//! them in transit fails the handshake. A recorded Hello replayed to a server gets a Welcome the
//! replayer cannot use; the server counts a client as joined only after its sealed [`Confirm`],
//! which takes the session keys.
//!
//! A secret on one side only fails the handshake on both: the side with the secret refuses
//! ([`HandshakeError`] says which side lacks it) and sends a [`RejectReason::Auth`] to the other;
//! so does a server whose secret differs from the client's (the Noise message does not
//! authenticate). The secret is never sent, in any form an observer could test guesses against
//! without also running the handshake with a node.
//!
//! The handshake itself ([`client_start`], [`server_on_hello`], [`client_on_welcome`],
//! [`server_on_confirm`]) does no IO; [`connect`] and [`accept`] drive it over any
//! `AsyncRead + AsyncWrite` stream. Handshake frames are plain JSON envelopes.
//!
//! # Session frames
//! See [`Sealer`] and [`Opener`]: with a secret every frame is one Noise transport message, so it
//! cannot be read, forged, replayed, reordered or reflected; without one, frames are plain JSON.

mod cipher;
mod handshake;
mod stream;
#[cfg(test)]
mod tests;

pub use cipher::{Opener, Sealer, SEAL_OVERHEAD};
pub use handshake::{
    client_on_welcome, client_start, server_on_confirm, server_on_hello, ClientPending,
    ServerPending, NOISE_PARAMS,
};
pub use stream::{accept, connect};

use super::wire::{Card, Reject, RejectReason, WireError};
#[cfg(doc)]
use super::{wire::Confirm, ClusterSecret};

/// The longest node id, in bytes.
pub const NODE_ID_MAX: usize = 64;

/// Checks a node id from a peer (or from this node's configuration): 1 to [`NODE_ID_MAX`]
/// characters, each an ASCII letter, digit, `-`, `_` or `.`. Node ids appear in logs, in `/cluster`
/// and as label values in `/metrics`; anything else is refused at the handshake, so no peer can
/// put quotes, newlines or megabytes there.
pub fn check_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("the node id is empty".into());
    }
    if id.len() > NODE_ID_MAX {
        return Err(format!(
            "the node id is {} bytes long; at most {NODE_ID_MAX} are allowed",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "the node id {:?} contains {c:?}; only letters, digits, '-', '_' and '.' are allowed",
            clip(id, ECHO_MAX)
        ));
    }
    Ok(())
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

    fn card(&self) -> Card {
        Card {
            node_id: self.node_id.clone(),
            advertised_addr: self.advertised_addr.clone(),
        }
    }
}

/// The peer at the other end of an established [`Session`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its node id (valid by [`check_node_id`]).
    pub node_id: String,
    /// Its release (equal to ours).
    pub version: String,
    /// Where its cluster channel listens.
    pub advertised_addr: String,
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
    /// True when both ends hold the cluster secret and frames are encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.sealer.is_encrypted()
    }

    /// The parts, for a reader task and a writer task.
    pub fn into_parts(self) -> (Peer, Sealer, Opener) {
        (self.peer, self.sealer, self.opener)
    }
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
    /// The reason of the refusal, whichever side refused. A client's Confirm that does not open
    /// counts as [`RejectReason::Auth`].
    pub fn reason(&self) -> Option<&RejectReason> {
        match self {
            HandshakeError::RejectedByPeer(r) | HandshakeError::Refused(r) => Some(&r.reason),
            HandshakeError::Wire(WireError::BadMac) => Some(&RejectReason::Auth),
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
            HandshakeError::Wire(WireError::BadMac) => Some(reject(
                RejectReason::Auth,
                "the confirmation did not decrypt under this session's keys",
            )),
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
/// Reject stays far below the frame limit, so it is always sent instead of failing to encode.
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
