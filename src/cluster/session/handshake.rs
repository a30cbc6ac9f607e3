//! The handshake as steps without IO: [`client_start`], [`server_on_hello`],
//! [`client_on_welcome`], [`server_on_confirm`].

use std::fmt;
use std::sync::Arc;

use snow::HandshakeState;

use super::super::secret::ClusterSecret;
use super::super::wire::{
    Card, Confirm, Envelope, Hello, Message, Reject, RejectReason, Sealed, Welcome, WireError,
    MAGIC, PROTOCOL, SEALED_MAX,
};
use super::cipher::{Keys, Opener, Sealer};
use super::{
    check_node_id, clip, received, reject, HandshakeError, Identity, Peer, Session, ECHO_MAX,
};

/// The Noise protocol of the peer channel: pattern `NNpsk0` (both sides anonymous but for the
/// pre-shared key; ephemeral Diffie-Hellman for forward secrecy), X25519, ChaCha20-Poly1305,
/// BLAKE2s.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";

/// The client's state between its [`Hello`] and the server's [`Welcome`].
pub struct ClientPending {
    identity: Identity,
    noise: Option<HandshakeState>,
}

/// The server's state between its [`Welcome`] and the client's [`Confirm`].
pub struct ServerPending {
    peer: Peer,
    cluster: String,
    keys: Option<Keys>,
}

impl fmt::Debug for ClientPending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientPending")
            .field("identity", &self.identity)
            .field("encrypted", &self.noise.is_some())
            .finish()
    }
}

impl fmt::Debug for ServerPending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerPending")
            .field("peer", &self.peer)
            .field("encrypted", &self.keys.is_some())
            .finish()
    }
}

impl ServerPending {
    /// True when the server must wait for a sealed [`Confirm`] (it has a secret).
    pub fn expects_confirm(&self) -> bool {
        self.keys.is_some()
    }
}

/// The Noise prologue: the cleartext fields both sides checked, so that changing them in transit
/// fails the handshake.
fn prologue(cluster: &str, version: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(64 + cluster.len() + version.len());
    p.extend_from_slice(b"openfhir-cache cluster handshake");
    p.extend_from_slice(&PROTOCOL.to_be_bytes());
    for field in [cluster, version] {
        // Lengths make the encoding unambiguous ("ab"+"c" is not "a"+"bc").
        p.extend_from_slice(&(field.len() as u64).to_be_bytes());
        p.extend_from_slice(field.as_bytes());
    }
    p
}

fn noise_state(
    secret: &ClusterSecret,
    identity: &Identity,
    initiator: bool,
) -> Result<HandshakeState, snow::Error> {
    let params = NOISE_PARAMS.parse()?;
    let prologue = prologue(&identity.cluster, &identity.version);
    let builder = snow::Builder::new(params)
        .psk(0, secret.noise_psk())?
        .prologue(&prologue)?;
    if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    }
}

/// The Noise library failed where it cannot for valid parameters (no randomness, say).
fn noise_failure(e: snow::Error) -> Reject {
    reject(
        RejectReason::Protocol,
        format!("the Noise handshake could not run: {e}"),
    )
}

fn card_json(identity: &Identity) -> Vec<u8> {
    // A struct of two strings always serializes.
    serde_json::to_vec(&identity.card()).unwrap_or_default()
}

/// Writes a handshake message carrying `payload`.
fn write(noise: &mut HandshakeState, payload: &[u8]) -> Result<Sealed, snow::Error> {
    let mut buf = vec![0u8; SEALED_MAX];
    let n = noise.write_message(payload, &mut buf)?;
    buf.truncate(n);
    Ok(Sealed(buf))
}

/// Reads a handshake message; `None` when it does not authenticate (another secret).
fn read(noise: &mut HandshakeState, msg: &Sealed) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; SEALED_MAX];
    let n = noise.read_message(&msg.0, &mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn parse_card(bytes: &[u8]) -> Result<Card, Reject> {
    serde_json::from_slice(bytes).map_err(|e| {
        reject(
            RejectReason::Protocol,
            format!("the peer's card is not valid: {e}"),
        )
    })
}

/// Step 1, client: the [`Hello`] to send.
pub fn client_start(
    identity: &Identity,
    secret: Option<&ClusterSecret>,
) -> Result<(Hello, ClientPending), HandshakeError> {
    let (card, noise, state) = match secret {
        None => (Some(identity.card()), None, None),
        Some(s) => {
            let mut state = noise_state(s, identity, true)
                .map_err(|e| HandshakeError::Refused(noise_failure(e)))?;
            let msg = write(&mut state, &card_json(identity))
                .map_err(|e| HandshakeError::Refused(noise_failure(e)))?;
            (None, Some(msg), Some(state))
        }
    };
    let hello = Hello {
        magic: MAGIC,
        protocol: PROTOCOL,
        cluster: identity.cluster.clone(),
        version: identity.version.clone(),
        card,
        noise,
    };
    let pending = ClientPending {
        identity: identity.clone(),
        noise: state,
    };
    Ok((hello, pending))
}

/// Checks the cleartext fields every Hello and Welcome carry.
fn check_clear(
    ours: &Identity,
    magic: u32,
    protocol: u16,
    cluster: &str,
    version: &str,
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
    Ok(())
}

/// Checks the peer's card: a valid node id, not ours.
fn check_card(ours: &Identity, card: &Card) -> Result<(), Reject> {
    check_node_id(&card.node_id).map_err(|e| {
        reject(
            RejectReason::Protocol,
            format!("the peer's node id is not valid: {e}"),
        )
    })?;
    if card.node_id == ours.node_id {
        return Err(reject(
            RejectReason::SameNodeId {
                node_id: card.node_id.clone(),
            },
            format!(
                "the peer has this node's own id {:?}: a node connected to itself, or two nodes share an id",
                card.node_id
            ),
        ));
    }
    Ok(())
}

fn peer_of(card: Card, version: &str) -> Peer {
    Peer {
        node_id: card.node_id,
        version: version.to_string(),
        advertised_addr: card.advertised_addr,
    }
}

/// The refusal when one side has a secret and the other has none.
fn one_sided(who_lacks: &str, who_requires: &str) -> Reject {
    reject(
        RejectReason::Auth,
        format!("{who_lacks} has no CLUSTER_SECRET but {who_requires} requires one"),
    )
}

fn auth_mismatch(peer: &str) -> Reject {
    reject(
        RejectReason::Auth,
        format!(
            "{peer} has a different CLUSTER_SECRET than this node (its Noise handshake message did not authenticate)"
        ),
    )
}

/// Step 2, server: checks the [`Hello`] and answers with a [`Welcome`], or with the [`Reject`]
/// to send.
pub fn server_on_hello(
    identity: &Identity,
    secret: Option<&ClusterSecret>,
    hello: &Hello,
) -> Result<(Welcome, ServerPending), Reject> {
    check_clear(
        identity,
        hello.magic,
        hello.protocol,
        &hello.cluster,
        &hello.version,
    )?;
    let (card, welcome_card, welcome_noise, keys) = match (secret, &hello.card, &hello.noise) {
        (None, Some(card), None) => (card.clone(), Some(identity.card()), None, None),
        (Some(s), None, Some(msg)) => {
            let mut state = noise_state(s, identity, false).map_err(noise_failure)?;
            let payload = read(&mut state, msg).ok_or_else(|| auth_mismatch("the peer"))?;
            let card = parse_card(&payload)?;
            check_card(identity, &card)?;
            let msg2 = write(&mut state, &card_json(identity)).map_err(noise_failure)?;
            let keys = state.into_stateless_transport_mode().map_err(noise_failure)?;
            (card, None, Some(msg2), Some(Arc::new(keys)))
        }
        (Some(_), Some(card), None) => {
            return Err(one_sided(
                &format!("node {:?}", clip(&card.node_id, ECHO_MAX)),
                &format!("node {:?}", identity.node_id),
            ))
        }
        (None, None, Some(_)) => {
            return Err(one_sided(
                &format!("node {:?}", identity.node_id),
                "the peer",
            ))
        }
        _ => {
            return Err(reject(
                RejectReason::Protocol,
                "a hello carries either a card (no cluster secret) or a Noise message, not both or neither",
            ))
        }
    };
    check_card(identity, &card)?;
    let welcome = Welcome {
        magic: MAGIC,
        protocol: PROTOCOL,
        cluster: identity.cluster.clone(),
        version: identity.version.clone(),
        card: welcome_card,
        noise: welcome_noise,
    };
    let pending = ServerPending {
        peer: peer_of(card, &hello.version),
        cluster: identity.cluster.clone(),
        keys,
    };
    Ok((welcome, pending))
}

/// Step 3, client: checks the [`Welcome`]. Returns the sealed [`Confirm`] frame payload to send
/// (`None` without a secret) and the session, usable once the confirmation is sent.
pub fn client_on_welcome(
    pending: ClientPending,
    welcome: &Welcome,
) -> Result<(Option<Vec<u8>>, Session), HandshakeError> {
    let ClientPending { identity, noise } = pending;
    let refused = HandshakeError::Refused;
    check_clear(
        &identity,
        welcome.magic,
        welcome.protocol,
        &welcome.cluster,
        &welcome.version,
    )
    .map_err(refused)?;
    let ours = format!("node {:?}", identity.node_id);
    match (noise, &welcome.card, &welcome.noise) {
        (None, Some(card), None) => {
            check_card(&identity, card).map_err(refused)?;
            let session = Session {
                peer: peer_of(card.clone(), &welcome.version),
                sealer: Sealer::plain(),
                opener: Opener::plain(),
            };
            Ok((None, session))
        }
        (Some(mut state), None, Some(msg)) => {
            let payload = read(&mut state, msg).ok_or_else(|| refused(auth_mismatch("the server")))?;
            let card = parse_card(&payload).map_err(refused)?;
            check_card(&identity, &card).map_err(refused)?;
            let keys = Arc::new(
                state
                    .into_stateless_transport_mode()
                    .map_err(|e| refused(noise_failure(e)))?,
            );
            let mut session = Session {
                peer: peer_of(card, &welcome.version),
                sealer: Sealer::keyed(keys.clone()),
                opener: Opener::keyed(keys),
            };
            let confirm = Envelope::new(&identity.cluster, Message::Confirm(Confirm {})).encode()?;
            let sealed = session.sealer.seal(&confirm)?;
            Ok((Some(sealed), session))
        }
        (Some(_), Some(card), None) => Err(refused(one_sided(
            &format!("node {:?}", clip(&card.node_id, ECHO_MAX)),
            &ours,
        ))),
        (None, None, Some(_)) => Err(refused(one_sided(&ours, "the server"))),
        _ => Err(refused(reject(
            RejectReason::Protocol,
            "a welcome carries either a card (no cluster secret) or a Noise message, not both or neither",
        ))),
    }
}

/// Step 4, server: with a secret, opens the client's sealed [`Confirm`] (the frame payload as
/// received); without one, `confirm` is `None`. Returns the session.
pub fn server_on_confirm(
    pending: ServerPending,
    confirm: Option<&[u8]>,
) -> Result<Session, HandshakeError> {
    let ServerPending {
        peer,
        cluster,
        keys,
    } = pending;
    let Some(keys) = keys else {
        if confirm.is_some() {
            return Err(HandshakeError::Refused(one_sided(
                "this node",
                &format!("node {:?}", peer.node_id),
            )));
        }
        return Ok(Session {
            peer,
            sealer: Sealer::plain(),
            opener: Opener::plain(),
        });
    };
    let Some(frame) = confirm else {
        return Err(HandshakeError::Refused(reject(
            RejectReason::Auth,
            format!(
                "node {:?} sent no confirmation of the session keys",
                peer.node_id
            ),
        )));
    };
    let mut opener = Opener::keyed(keys.clone());
    let body = match opener.open(frame) {
        Ok(json) => Envelope::decode(json, &cluster)?.body,
        // A client that refused our Welcome answers with a plain Reject instead.
        Err(WireError::BadMac) => match Envelope::decode(frame, &cluster).map(|e| e.body) {
            Ok(Message::Reject(r)) => return Err(received(r)),
            _ => return Err(HandshakeError::Wire(WireError::BadMac)),
        },
        Err(e) => return Err(e.into()),
    };
    match body {
        Message::Confirm(_) => Ok(Session {
            peer,
            sealer: Sealer::keyed(keys),
            opener,
        }),
        other => Err(HandshakeError::Unexpected {
            expected: "confirm",
            got: other.kind(),
        }),
    }
}
