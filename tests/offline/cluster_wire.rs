//! The cluster wire protocol and handshake, end to end over in-memory streams, plus property tests
//! that every decoder is total.

use openfhir_cache::cache::Change;
use openfhir_cache::cluster::{
    accept, connect, decode_body, decode_frame, decode_frame_header, encode_body, encode_frame,
    read_frame, write_frame, ClusterSecret, Envelope, HandshakeError, Heartbeat, Identity,
    Invalidate, Leave, Message, Opener, RejectReason, Session, WireError, MAX_FRAME,
};
use proptest::prelude::*;
use tokio::io::{AsyncWriteExt, DuplexStream};

// ---------------------------------------------------------------------------------------------
// The binary's allocator (`alloc.rs`) records the largest single allocation made by the current
// thread, to prove that a huge length header is refused before anything is allocated for it.

use crate::alloc::LARGEST;

/// Runs `fut` to completion on this thread and returns its output with the largest allocation
/// this thread made meanwhile.
fn largest_allocation_during<F: std::future::Future>(fut: F) -> (F::Output, usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut fut = std::pin::pin!(fut);
    LARGEST.with(|m| m.set(0));
    let out = rt.block_on(&mut fut);
    (out, LARGEST.with(|m| m.get()))
}

#[test]
fn a_4_gib_length_header_is_refused_without_allocating() {
    let header = [0xff_u8; 4];
    let (res, largest) = largest_allocation_during(async {
        let mut r: &[u8] = &header;
        read_frame(&mut r, MAX_FRAME).await
    });
    assert!(
        matches!(
            res,
            Err(WireError::TooLarge {
                len: 0xffff_ffff,
                max: MAX_FRAME
            })
        ),
        "{res:?}"
    );
    assert!(
        largest < 4096,
        "allocated {largest} bytes for a refused frame"
    );

    // Positive control: the recorder does see a real frame's buffer.
    let frame = encode_frame(&vec![1; 60_000]).unwrap();
    let (res, largest) = largest_allocation_during(async {
        let mut r: &[u8] = &frame;
        read_frame(&mut r, MAX_FRAME).await
    });
    assert_eq!(res.unwrap().len(), 60_000);
    assert!(largest >= 60_000);
}

// ---------------------------------------------------------------------------------------------
// Property tests: decoders are total, frames round-trip.

fn keyed_sessions() -> (Session, Session) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let s = ClusterSecret::new("k");
    let (mut a, mut b) = tokio::io::duplex(MAX_FRAME);
    let (ida, idb) = (id("a"), id("b"));
    rt.block_on(async {
        let (c, srv) = tokio::join!(
            connect(&mut a, &ida, s.as_ref()),
            accept(&mut b, &idb, s.as_ref())
        );
        (c.unwrap(), srv.unwrap())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_frame_header(&bytes, MAX_FRAME);
        let _ = decode_frame(&bytes, MAX_FRAME);
        let _ = Envelope::decode(&bytes, "prod");
        let _ = Envelope::peek_header(&bytes);
        let _ = decode_body(&bytes);
        let _ = Opener::plain().open(&bytes);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut r: &[u8] = &bytes;
        let _ = rt.block_on(read_frame(&mut r, MAX_FRAME));
    }

    #[test]
    fn json_like_input_never_panics(s in r#"\{("[a-z_]{0,8}":(-?[0-9]{1,12}|"[ -~]{0,12}"|null|\{\}|\[\]),?){0,8}\}"#) {
        let _ = Envelope::decode(s.as_bytes(), "prod");
    }

    #[test]
    fn keyed_open_never_panics_and_never_accepts_garbage(
        bytes in proptest::collection::vec(any::<u8>(), 0..256)
    ) {
        let (_, mut server) = keyed_sessions();
        prop_assert!(server.opener.open(&bytes).is_err());
        prop_assert_eq!(server.opener.opened(), 1, "only the confirmation was accepted");
    }

    #[test]
    fn frames_round_trip(payloads in proptest::collection::vec(
        proptest::collection::vec(any::<u8>(), 1..3000), 1..8)
    ) {
        let mut stream = Vec::new();
        for p in &payloads {
            stream.extend_from_slice(&encode_frame(p).unwrap());
        }
        let mut rest = &stream[..];
        for p in &payloads {
            let (got, r) = decode_frame(rest, MAX_FRAME).unwrap();
            prop_assert_eq!(got, &p[..]);
            rest = r;
        }
        prop_assert!(rest.is_empty());

        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let (mut a, mut b) = tokio::io::duplex(512);
            let writer = async {
                for p in &payloads {
                    write_frame(&mut a, p).await.unwrap();
                }
                drop(a);
            };
            let reader = async {
                let mut got = Vec::new();
                loop {
                    match read_frame(&mut b, MAX_FRAME).await {
                        Ok(p) => got.push(p),
                        Err(WireError::Closed) => break got,
                        Err(e) => panic!("{e}"),
                    }
                }
            };
            let ((), got) = tokio::join!(writer, reader);
            assert_eq!(got, payloads);
        });
    }

    #[test]
    fn invalidations_round_trip(
        origin in "[ -~]{1,20}",
        seq in any::<u64>(),
        pos in proptest::option::of(any::<i64>()),
        tenant in "\\PC{1,20}",
        key in "\\PC{1,40}",
    ) {
        let env = Envelope::new("prod", Message::Invalidate(Invalidate {
            origin,
            seq,
            log_position: pos,
            change: Change::Context { tenant, template_id: key },
            at_unix_ms: Some(seq),
        }));
        prop_assert_eq!(Envelope::decode(&env.encode().unwrap(), "prod").unwrap(), env.clone());
        // The session's binary form as well.
        prop_assert_eq!(decode_body(&encode_body(&env.body).unwrap()).unwrap(), env.body);
    }

    #[test]
    fn binary_bodies_with_random_edits_decode_or_fail_cleanly(
        seq in any::<u64>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let body = encode_body(&Message::Invalidate(Invalidate {
            origin: "node-a".into(),
            seq,
            log_position: Some(7),
            change: Change::Custom { group: "g".into(), tenant: Some("t".into()), key: None },
            at_unix_ms: Some(seq),
        }))
        .unwrap();
        let mut b = body.clone();
        for (i, v) in &edits {
            let i = i.index(b.len());
            b[i] = *v;
        }
        // Whatever decodes encodes back to the same bytes: nothing is silently reinterpreted.
        if let Ok(m) = decode_body(&b) {
            prop_assert_eq!(encode_body(&m).unwrap(), b.clone());
        }
        let _ = decode_body(&b[..cut.index(b.len())]);
    }

    #[test]
    fn any_flipped_bit_of_a_sealed_frame_is_refused(index in any::<prop::sample::Index>(), bit in 0u8..8) {
        let (mut client, mut server) = keyed_sessions();
        let env = Envelope::new("prod", Message::Leave(Leave { origin: "a".into() }));
        let mut frame = client.sealer.seal(&encode_body(&env.body).unwrap()).unwrap();
        let i = index.index(frame.len());
        frame[i] ^= 1 << bit;
        prop_assert!(matches!(server.opener.open(&frame), Err(WireError::BadMac)));
    }
}

// ---------------------------------------------------------------------------------------------
// Handshakes over in-memory streams.

fn id(node: &str) -> Identity {
    Identity::new("prod", node, format!("{node}.cluster:7800"))
}

async fn handshake(
    client: Identity,
    client_secret: Option<&str>,
    server: Identity,
    server_secret: Option<&str>,
) -> (
    Result<Session, HandshakeError>,
    Result<Session, HandshakeError>,
    DuplexStream,
    DuplexStream,
) {
    let (cs, ss) = (
        client_secret.and_then(ClusterSecret::new),
        server_secret.and_then(ClusterSecret::new),
    );
    let (mut a, mut b) = tokio::io::duplex(MAX_FRAME);
    let (c, s) = tokio::join!(
        connect(&mut a, &client, cs.as_ref()),
        accept(&mut b, &server, ss.as_ref())
    );
    (c, s, a, b)
}

fn heartbeat(origin: &str, seq: u64) -> Envelope {
    Envelope::new(
        "prod",
        Message::Heartbeat(Heartbeat {
            origin: origin.into(),
            seq,
            at_unix_ms: 1_700_000_000_000 + seq,
            peers: Vec::new(),
        }),
    )
}

async fn exchange(
    client: &mut Session,
    a: &mut DuplexStream,
    server: &mut Session,
    b: &mut DuplexStream,
) {
    for seq in 1..=3 {
        client.sealer.send(a, &heartbeat("a", seq)).await.unwrap();
        server.sealer.send(b, &heartbeat("b", seq)).await.unwrap();
    }
    for seq in 1..=3 {
        assert_eq!(
            server.opener.recv(b, "prod").await.unwrap(),
            heartbeat("a", seq)
        );
        assert_eq!(
            client.opener.recv(a, "prod").await.unwrap(),
            heartbeat("b", seq)
        );
    }
}

#[tokio::test]
async fn handshake_and_messages_without_secret() {
    let (c, s, mut a, mut b) = handshake(id("a"), None, id("b"), None).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert!(!c.is_encrypted() && !s.is_encrypted());
    assert_eq!(c.peer.node_id, "b");
    assert_eq!(s.peer.node_id, "a");
    assert_eq!(s.peer.advertised_addr, "a.cluster:7800");
    exchange(&mut c, &mut a, &mut s, &mut b).await;
}

#[tokio::test]
async fn handshake_and_messages_with_secret() {
    let (c, s, mut a, mut b) = handshake(id("a"), Some("s3cret"), id("b"), Some("s3cret")).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert!(c.is_encrypted() && s.is_encrypted());
    exchange(&mut c, &mut a, &mut s, &mut b).await;
    // The confirmation, then three messages.
    assert_eq!(c.sealer.sealed(), 4);
    assert_eq!(s.opener.opened(), 4);
}

fn assert_reason(r: &Result<Session, HandshakeError>, want: &RejectReason, refused_by_us: bool) {
    match r {
        Err(e @ HandshakeError::Refused(rej)) if refused_by_us => {
            assert_eq!(&rej.reason, want, "{e}")
        }
        Err(e @ HandshakeError::RejectedByPeer(rej)) if !refused_by_us => {
            assert_eq!(&rej.reason, want, "{e}")
        }
        other => panic!("expected {want:?} (refused_by_us: {refused_by_us}), got {other:?}"),
    }
}

#[tokio::test]
async fn wrong_secret_fails_on_both_sides() {
    // The server cannot authenticate the client's first Noise message, and says so.
    let (c, s, _a, _b) = handshake(id("a"), Some("one"), id("b"), Some("two")).await;
    assert_reason(&c, &RejectReason::Auth, false);
    assert_reason(&s, &RejectReason::Auth, true);
    assert!(c
        .unwrap_err()
        .to_string()
        .contains("different CLUSTER_SECRET"));
}

#[tokio::test]
async fn secret_only_on_the_server_fails_on_both_sides() {
    let (c, s, _a, _b) = handshake(id("a"), None, id("b"), Some("k")).await;
    assert_reason(&c, &RejectReason::Auth, false);
    assert_reason(&s, &RejectReason::Auth, true);
    assert!(c
        .unwrap_err()
        .to_string()
        .contains("node \"a\" has no CLUSTER_SECRET but node \"b\" requires one"));
}

#[tokio::test]
async fn secret_only_on_the_client_fails_on_both_sides() {
    let (c, s, _a, _b) = handshake(id("a"), Some("k"), id("b"), None).await;
    assert_reason(&c, &RejectReason::Auth, false);
    assert_reason(&s, &RejectReason::Auth, true);
    assert!(c
        .unwrap_err()
        .to_string()
        .contains("node \"b\" has no CLUSTER_SECRET but the peer requires one"));
}

#[tokio::test]
async fn wrong_cluster_name_is_rejected_with_both_names() {
    let mut other = id("b");
    other.cluster = "staging".into();
    let (c, s, _a, _b) = handshake(id("a"), None, other, None).await;
    let want = RejectReason::ClusterName {
        ours: "staging".into(),
        theirs: "prod".into(),
    };
    assert_reason(&s, &want, true);
    assert_reason(&c, &want, false);
}

#[tokio::test]
async fn different_release_is_rejected_with_both_versions() {
    let mut old = id("a");
    old.version = "0.0.1".into();
    let (c, s, _a, _b) = handshake(old, Some("k"), id("b"), Some("k")).await;
    let want = RejectReason::Version {
        ours: env!("CARGO_PKG_VERSION").into(),
        theirs: "0.0.1".into(),
    };
    assert_reason(&s, &want, true);
    assert_reason(&c, &want, false);
    let msg = c.unwrap_err().to_string();
    assert!(
        msg.contains("0.0.1") && msg.contains(env!("CARGO_PKG_VERSION")),
        "{msg}"
    );
}

#[tokio::test]
async fn a_node_connecting_to_itself_is_refused() {
    let (c, s, _a, _b) = handshake(id("a"), None, id("a"), None).await;
    let want = RejectReason::SameNodeId {
        node_id: "a".into(),
    };
    assert_reason(&s, &want, true);
    assert_reason(&c, &want, false);
}

#[tokio::test]
async fn garbage_instead_of_hello_gets_a_protocol_reject() {
    let (mut a, mut b) = tokio::io::duplex(MAX_FRAME);
    let client = async {
        write_frame(&mut a, b"GET / HTTP/1.1").await.unwrap();
        let frame = read_frame(&mut a, MAX_FRAME).await.unwrap();
        Envelope::decode(&frame, "prod").unwrap()
    };
    let server = id("b");
    let (reply, s) = tokio::join!(client, accept(&mut b, &server, None));
    assert!(
        matches!(s, Err(HandshakeError::Wire(WireError::Malformed(_)))),
        "{s:?}"
    );
    match reply.body {
        Message::Reject(r) => assert_eq!(r.reason, RejectReason::Protocol),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_peer_of_another_protocol_version_is_reported_as_such() {
    let (mut a, mut b) = tokio::io::duplex(MAX_FRAME);
    let future_hello =
        br#"{"magic":1330004785,"protocol":4,"cluster":"prod","body":{"type":"hello2"}}"#;
    a.write_all(&encode_frame(future_hello).unwrap())
        .await
        .unwrap();
    let s = accept(&mut b, &id("b"), None).await;
    assert!(
        matches!(
            s,
            Err(HandshakeError::Wire(WireError::UnsupportedProtocol {
                got: 4
            }))
        ),
        "{s:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Session frames over the stream: tampering, replay, reflection.

#[tokio::test]
async fn a_tampered_frame_fails_the_mac() {
    let (c, s, mut a, mut b) = handshake(id("a"), Some("k"), id("b"), Some("k")).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    let body = encode_body(&heartbeat("a", 1).body).unwrap();
    let mut frame = c.sealer.seal(&body).unwrap();
    // Change the message (sequence number 1 -> 2: the last byte of the u64 after the type byte
    // and the origin "a") and keep the MAC.
    let at = 1 + 2 + 7;
    assert_eq!(body[at], 1);
    frame[at] ^= 3;
    write_frame(&mut a, &frame).await.unwrap();
    let err = s.opener.recv(&mut b, "prod").await.unwrap_err();
    assert!(
        matches!(err, WireError::BadMac) && err.is_security(),
        "{err}"
    );
}

#[tokio::test]
async fn a_replayed_frame_is_rejected() {
    let (c, s, mut a, mut b) = handshake(id("a"), Some("k"), id("b"), Some("k")).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    let frame = c
        .sealer
        .seal(&encode_body(&heartbeat("a", 1).body).unwrap())
        .unwrap();
    write_frame(&mut a, &frame).await.unwrap();
    write_frame(&mut a, &frame).await.unwrap();
    assert_eq!(
        s.opener.recv(&mut b, "prod").await.unwrap(),
        heartbeat("a", 1)
    );
    let err = s.opener.recv(&mut b, "prod").await.unwrap_err();
    assert!(
        matches!(err, WireError::BadMac),
        "a replay does not open: {err}"
    );
}

#[tokio::test]
async fn a_frame_cannot_be_reflected_back_to_its_sender() {
    let (c, s, mut a, mut b) = handshake(id("a"), Some("k"), id("b"), Some("k")).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    // An attacker in the middle takes the client's frame and sends it back to the client ...
    let from_client = c
        .sealer
        .seal(&encode_body(&heartbeat("a", 1).body).unwrap())
        .unwrap();
    write_frame(&mut b, &from_client).await.unwrap();
    let err = c.opener.recv(&mut a, "prod").await.unwrap_err();
    assert!(matches!(err, WireError::BadMac), "{err}");
    // ... and the server's frame back to the server.
    let from_server = s
        .sealer
        .seal(&encode_body(&heartbeat("b", 1).body).unwrap())
        .unwrap();
    write_frame(&mut a, &from_server).await.unwrap();
    let err = s.opener.recv(&mut b, "prod").await.unwrap_err();
    assert!(matches!(err, WireError::BadMac), "{err}");
}

#[tokio::test]
async fn an_unsealed_frame_is_refused_by_an_authenticated_session() {
    let (c, s, mut a, mut b) = handshake(id("a"), Some("k"), id("b"), Some("k")).await;
    let (_c, mut s) = (c.unwrap(), s.unwrap());
    let plain = encode_body(&heartbeat("a", 1).body).unwrap();
    write_frame(&mut a, &plain).await.unwrap();
    assert!(matches!(
        s.opener.recv(&mut b, "prod").await,
        Err(WireError::BadMac)
    ));
}

#[tokio::test]
async fn session_messages_carry_no_cluster_name_and_json_is_refused_after_the_handshake() {
    let (c, s, mut a, mut b) = handshake(id("a"), None, id("b"), None).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    // The handshake settled the cluster: a message sent in another cluster's envelope arrives
    // in ours (the binary form has no cluster name to disagree with).
    let foreign = Envelope::new("staging", Message::Leave(Leave { origin: "a".into() }));
    c.sealer.send(&mut a, &foreign).await.unwrap();
    let got = s.opener.recv(&mut b, "prod").await.unwrap();
    assert_eq!(
        got,
        Envelope::new("prod", Message::Leave(Leave { origin: "a".into() }))
    );
    // A protocol-2 session frame (a JSON envelope) is malformed under protocol 3.
    let json = Envelope::new("prod", Message::Leave(Leave { origin: "a".into() }))
        .encode()
        .unwrap();
    write_frame(&mut a, &c.sealer.seal(&json).unwrap())
        .await
        .unwrap();
    assert!(matches!(
        s.opener.recv(&mut b, "prod").await,
        Err(WireError::Malformed(_))
    ));
}

#[tokio::test]
async fn a_protocol_2_peer_is_refused_with_its_version() {
    let (mut a, mut b) = tokio::io::duplex(MAX_FRAME);
    let old_hello = br#"{"magic":1330004785,"protocol":2,"cluster":"prod","body":{"type":"hello","magic":1330004785,"protocol":2,"cluster":"prod","version":"0.1.0","card":{"node_id":"a","advertised_addr":"a:7800"}}}"#;
    a.write_all(&encode_frame(old_hello).unwrap())
        .await
        .unwrap();
    let s = accept(&mut b, &id("b"), None).await;
    assert!(
        matches!(
            s,
            Err(HandshakeError::Wire(WireError::UnsupportedProtocol {
                got: 2
            }))
        ),
        "{s:?}"
    );
    // And it is told why.
    let reply = read_frame(&mut a, MAX_FRAME).await.unwrap();
    match Envelope::decode(&reply, "prod").unwrap().body {
        Message::Reject(r) => {
            assert_eq!(r.reason, RejectReason::Protocol);
            assert!(r.message.contains("version 2"), "{}", r.message);
        }
        other => panic!("{other:?}"),
    }
}
