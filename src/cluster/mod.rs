//! The peer cluster channel: nodes telling each other directly what changed.
//!
//! PostgreSQL stays the source of truth and its NOTIFY and catch-up channels stay the guarantee
//! (see `COHERENCE.md`). The peer channel is meant to be a faster, database-independent path for
//! the same [`Change`](crate::cache::Change)s, applied through the same rule
//! ([`crate::cache::targets`]).
//!
//! # What exists now
//! Only the protocol, as pure code with unit and property tests; nothing listens on
//! `CLUSTER_PORT` yet.
//!
//! * [`wire`]: length-prefixed frames ([`read_frame`], [`write_frame`], at most [`MAX_FRAME`]
//!   bytes, the length checked before allocating) and the JSON [`Envelope`] around every
//!   [`Message`], carrying the magic number [`MAGIC`] (`"OFC1"`), the protocol version
//!   [`PROTOCOL`] and the cluster name. Decoders are total: any bytes give a message or a
//!   [`WireError`].
//! * [`auth`]: the handshake ([`Hello`], [`Welcome`], [`Proof`] or [`Reject`]) as a state
//!   machine without IO ([`client_start`], [`server_on_hello`], [`client_on_welcome`],
//!   [`server_on_proof`]) plus drivers over any async stream ([`connect`], [`accept`]). Peers
//!   must agree on the cluster name and the release. With a `CLUSTER_SECRET` both sides prove it
//!   (HMAC-SHA256 challenge-response) and every later frame carries a MAC and a sequence number
//!   ([`Sealer`], [`Opener`]), so frames cannot be forged, replayed, reordered or reflected.
//!
//! # Planned
//! * **Discovery** (`CLUSTER_DISCOVERY`): `MULTICAST` announcements on the LAN, `DNS` (resolving
//!   `CLUSTER_DNS_QUERY`, a headless service, again on a timer) and `TCP` (the static
//!   `CLUSTER_INITIAL_HOSTS`, re-resolved on a timer).
//! * **Membership**: a plain struct, fed with events and `tokio::time::Instant`s, that moves each
//!   peer through alive, suspect (heartbeats missed) and gone, and notices restarts.
//! * **Transport**: one connection per peer with a bounded outgoing queue, so a slow peer is
//!   dropped and reconnected rather than allowed to hold memory or block the others.
//! * **Broadcast**: every committed local change sent as an [`Invalidate`] to every alive peer;
//!   [`Heartbeat`]s carry the origin's last sequence number so a receiver that sees a gap runs a
//!   catch-up step instead of trusting the channel; [`Leave`] on clean shutdown.
//! * **Configuration**: a cluster name, a node id and `CLUSTER_SECRET` (masked like the other
//!   secrets) are not settings yet.

pub mod auth;
pub mod broadcast;
pub mod discovery;
pub mod membership;
mod transport;
pub mod wire;

pub use broadcast::{Cluster, ClusterReport, CountersReport};
pub use membership::{PeerReport, PeerState, Rejected};
pub use transport::start;

pub use auth::{
    accept, client_on_welcome, client_start, connect, server_on_hello, server_on_proof,
    ClientPending, ClusterSecret, Direction, HandshakeError, Identity, Opener, Peer, Sealer,
    ServerPending, Session, SEAL_OVERHEAD,
};
pub use wire::{
    decode_frame, decode_frame_header, encode_frame, read_frame, write_frame, Envelope,
    EnvelopeHeader, Heartbeat, Hello, Invalidate, Leave, Message, Nonce, Proof, Reject,
    RejectReason, Tag, Welcome, WireError, FRAME_HEADER_LEN, MAGIC, MAX_FRAME, NONCE_LEN, PROTOCOL,
    TAG_LEN,
};
