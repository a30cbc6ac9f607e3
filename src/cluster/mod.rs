//! The peer cluster channel: nodes telling each other directly what changed.
//!
//! PostgreSQL stays the source of truth and its NOTIFY and catch-up channels stay the guarantee
//! (see `docs/coherence.md`). The peer channel is meant to be a faster, database-independent path for
//! the same [`Change`](crate::cache::Change)s, applied through the same rule
//! ([`crate::cache::targets`]).
//!
//! # Layout
//! * [`broadcast`]: the [`Cluster`] handle a node holds. It owns the
//!   broadcast sequence, one bounded queue per connected peer and the [`membership`] table, all
//!   behind one short lock that is never held across an await; [`Cluster::broadcast`] never waits.
//! * [`transport`](start): the tasks. The listener accepts and authenticates peers and reads their
//!   frames; one dialer per discovered address keeps a sending connection up, with backoff; each
//!   sending connection has its own writer task that drains its queue and sends heartbeats (a
//!   broadcast to an idle link writes the socket itself, without the hop, see `pipe`); a
//!   failure detector moves silent peers to suspect and gone; a gap-repair task runs a database
//!   catch-up step when a peer's sequence numbers skip.
//! * [`discovery`]: `MULTICAST`, `DNS` and `TCP`, each a task publishing the addresses it knows.
//! * [`membership`]: alive, suspect, gone and left, as a plain table driven by events and
//!   instants (unit-tested without sockets).
//! * [`wire`]: length-prefixed frames ([`read_frame`], [`write_frame`], at most [`MAX_FRAME`]
//!   bytes, the length checked before allocating), the JSON [`Envelope`] around every handshake
//!   [`Message`], carrying the magic number [`MAGIC`] (`"OFC1"`), the protocol version
//!   [`PROTOCOL`] and the cluster name, and the compact binary form of the messages after it
//!   ([`encode_body`], [`decode_body`]). Decoders are total: any bytes give a message or a
//!   [`WireError`].
//! * [`session`]: the handshake ([`Hello`], [`Welcome`], [`Confirm`] or [`Reject`]) as steps
//!   without IO plus drivers over any async stream ([`connect`], [`accept`]). Peers must agree on
//!   the cluster name and the release, and node ids must be valid ([`check_node_id`]). With a
//!   `CLUSTER_SECRET` ([`secret`]) the handshake is Noise `NNpsk0` and every later frame is
//!   encrypted and authenticated ([`Sealer`], [`Opener`]), so frames cannot be read, forged,
//!   replayed, reordered or reflected, and a leaked secret does not decrypt recorded sessions.
//!
//! # Why two connections per pair
//! A node sends only on connections it dialed and receives only on connections it accepted.
//! Each sending socket then has one short lock that orders everything written to it (the
//! broadcaster's direct writes and its writer task's), and a peer that connected to us is dialed
//! back at its source IP and advertised port, so discovery that works in one direction is enough.

pub mod broadcast;
pub mod discovery;
pub mod membership;
mod pipe;
pub mod secret;
pub mod session;
mod transport;
pub mod wire;

pub use broadcast::{Cluster, ClusterReport, CountersReport};
pub use membership::{PeerReport, PeerState, Rejected};
pub use transport::{
    start, TASK_ACCEPT, TASK_DISCOVERY, TASK_FAILURE_DETECTOR, TASK_GAP_REPAIR, TASK_RECONCILE,
};

pub use secret::ClusterSecret;
pub use session::{
    accept, check_node_id, client_on_welcome, client_start, connect, server_on_confirm,
    server_on_hello, ClientPending, HandshakeError, Identity, Opener, Peer, Sealer, ServerPending,
    Session, NOISE_PARAMS, SEAL_OVERHEAD,
};
pub use wire::{
    decode_body, decode_frame, decode_frame_header, encode_body, encode_frame, encode_invalidate,
    read_frame, write_frame, Card, Confirm, Envelope, EnvelopeHeader, Heartbeat, Hello, Invalidate,
    Leave, Message, Reject, RejectReason, Sealed, Tag, Welcome, WireError, FRAME_HEADER_LEN, MAGIC,
    MAX_FRAME, PROTOCOL, SEALED_MAX, TAG_LEN,
};
