//! The messages of the cluster channel: the handshake's and the ones a joined peer sends.

use serde::{Deserialize, Serialize};

use super::{Nonce, Tag};
use crate::cache::Change;

/// The client's first message: who it is, and its nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// [`MAGIC`](super::MAGIC).
    pub magic: u32,
    /// [`PROTOCOL`](super::PROTOCOL).
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
    /// [`MAGIC`](super::MAGIC).
    pub magic: u32,
    /// [`PROTOCOL`](super::PROTOCOL).
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
