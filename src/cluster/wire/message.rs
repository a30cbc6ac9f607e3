//! The messages of the cluster channel: the handshake's and the ones a joined peer sends.

use serde::{Deserialize, Serialize};

use super::Sealed;
use crate::cache::Change;

/// Who a node is, as it tells its peers in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Card {
    /// The node's id (checked with [`check_node_id`](crate::cluster::check_node_id)).
    pub node_id: String,
    /// The `host:port` where the node's own cluster channel listens.
    pub advertised_addr: String,
}

/// The client's first message. The fields every peer must agree on travel in clear, so a
/// mismatch is refused with its reason even between nodes with different secrets; who the client
/// is travels in clear only without a cluster secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// [`MAGIC`](super::MAGIC).
    pub magic: u32,
    /// [`PROTOCOL`](super::PROTOCOL).
    pub protocol: u16,
    /// The client's cluster name.
    pub cluster: String,
    /// The client's release (`CARGO_PKG_VERSION`); must equal the server's.
    pub version: String,
    /// The client's card, without a cluster secret.
    #[serde(default)]
    pub card: Option<Card>,
    /// With a cluster secret: Noise handshake message 1 (`-> psk, e`), its payload the client's
    /// card (JSON).
    #[serde(default)]
    pub noise: Option<Sealed>,
}

/// The server's answer to an acceptable [`Hello`], shaped like it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Welcome {
    /// [`MAGIC`](super::MAGIC).
    pub magic: u32,
    /// [`PROTOCOL`](super::PROTOCOL).
    pub protocol: u16,
    /// The server's cluster name.
    pub cluster: String,
    /// The server's release.
    pub version: String,
    /// The server's card, without a cluster secret.
    #[serde(default)]
    pub card: Option<Card>,
    /// With a cluster secret: Noise handshake message 2 (`<- e, ee`), its payload the server's
    /// card.
    #[serde(default)]
    pub noise: Option<Sealed>,
}

/// With a cluster secret, the client's first sealed frame: proof that it holds the session keys
/// (and not merely a recording of another client's [`Hello`]). The server counts the client as
/// joined only after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Confirm {}

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
    /// The cluster secret check failed: another secret, or a secret on one side only.
    Auth,
    /// The peer broke the protocol: bad magic, another protocol version, an unexpected message,
    /// an invalid node id.
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
    /// The origin's wall clock when it sent the change (after COMMIT), in milliseconds since the
    /// Unix epoch: the receiver times the delivery with it. Optional, so a frame without it
    /// (from a build before this field) still decodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_unix_ms: Option<u64>,
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
    /// TCP discovery only: the cluster addresses of the peers the origin is linked with, so that
    /// nodes whose `CLUSTER_INITIAL_HOSTS` list only some of the others still find every node
    /// (at most [`MAX_GOSSIP`] are read).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<std::net::SocketAddr>,
}

/// Most peer addresses read from one [`Heartbeat`]: more than any real cluster has, few enough
/// that a hostile peer cannot make a node dial the world.
pub const MAX_GOSSIP: usize = 256;

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
    /// Handshake, client to server, sealed, with a cluster secret only.
    Confirm(Confirm),
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
            Message::Confirm(_) => "confirm",
            Message::Invalidate(_) => "invalidate",
            Message::Heartbeat(_) => "heartbeat",
            Message::Leave(_) => "leave",
        }
    }
}
