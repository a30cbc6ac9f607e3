//! The hand-made seeds of the cluster fuzz targets (`fuzz/seeds/cluster_frame`, `session_open`
//! and `handshake_server`), built here from this release's types so that they follow the wire
//! format: this test fails when a seed on disk differs from what the current code would send
//! (they went stale once, still speaking protocol 1 under protocol 2), and
//! `FUZZ_SEEDS_WRITE=1 cargo test --test offline fuzz_seeds` writes them anew.
//!
//! Seeds whose bytes are random (a Noise handshake message) are only checked to decode as a
//! Hello of this protocol.

use std::path::{Path, PathBuf};

use openfhir_cache::cache::{Change, Group};
use openfhir_cache::cluster::{
    client_start, decode_frame, encode_body, encode_frame, ClusterSecret, Confirm, Envelope,
    Heartbeat, Hello, Identity, Invalidate, Leave, Message, Reject, RejectReason, MAGIC, MAX_FRAME,
    PROTOCOL,
};

fn frame(payload: &[u8]) -> Vec<u8> {
    encode_frame(payload).unwrap()
}

fn json(cluster: &str, m: Message) -> Vec<u8> {
    frame(&Envelope::new(cluster, m).encode().unwrap())
}

fn binary(m: Message) -> Vec<u8> {
    frame(&encode_body(&m).unwrap())
}

fn hello(cluster: &str, secret: Option<&ClusterSecret>) -> Hello {
    client_start(&Identity::new(cluster, "a", "a.cluster:7800"), secret)
        .unwrap()
        .0
}

fn invalidate(change: Change, at_unix_ms: Option<u64>) -> Message {
    Message::Invalidate(Invalidate {
        origin: "n1".into(),
        seq: 42,
        log_position: Some(9),
        change,
        at_unix_ms,
    })
}

fn opt() -> Change {
    Change::Opt {
        tenant: "default".into(),
        template_id: "growth_chart".into(),
    }
}

fn heartbeat() -> Message {
    Message::Heartbeat(Heartbeat {
        origin: "n1".into(),
        seq: 1,
        at_unix_ms: 1_700_000_000_000,
        peers: vec![
            "10.0.0.2:7800".parse().unwrap(),
            "[fd00::3]:7800".parse().unwrap(),
        ],
    })
}

fn leave() -> Message {
    Message::Leave(Leave {
        origin: "n1".into(),
    })
}

/// One step of a `session_open` program: opcode, length, bytes.
fn step(op: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![op, u8::try_from(bytes.len()).unwrap()];
    v.extend_from_slice(bytes);
    v
}

/// The deterministic seeds: (target, file, bytes).
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let reject = Message::Reject(Reject {
        reason: RejectReason::Version {
            ours: "0.1.0".into(),
            theirs: "0.2.0".into(),
        },
        message: "no".into(),
    });
    let mut welcome = hello("prod", None);
    welcome.card.as_mut().unwrap().node_id = "b".into();
    let welcome = Message::Welcome(openfhir_cache::cluster::Welcome {
        magic: welcome.magic,
        protocol: welcome.protocol,
        cluster: welcome.cluster,
        version: welcome.version,
        card: welcome.card,
        noise: None,
    });
    let future = format!(
        r#"{{"magic":{MAGIC},"protocol":{},"cluster":"prod","body":{{"type":"hello2"}}}}"#,
        PROTOCOL + 1
    );
    let leave_body = encode_body(&leave()).unwrap();
    let mut forged = leave_body.clone();
    forged.extend_from_slice(&[0x5a; 16]);
    let mut two = binary(heartbeat());
    two.extend_from_slice(&binary(leave()));
    let with_flag = |flag: u8, bytes: Vec<u8>| {
        let mut v = vec![flag];
        v.extend_from_slice(&bytes);
        v
    };
    vec![
        ("cluster_frame", "future-protocol", frame(future.as_bytes())),
        ("cluster_frame", "header-4gib", vec![0xff; 4]),
        ("cluster_frame", "header-empty", vec![0; 4]),
        ("cluster_frame", "truncated", vec![0, 0, 0, 16, b'a', b'b']),
        (
            "cluster_frame",
            "hello",
            json("prod", Message::Hello(hello("prod", None))),
        ),
        ("cluster_frame", "welcome", json("prod", welcome)),
        ("cluster_frame", "reject", json("prod", reject.clone())),
        (
            "cluster_frame",
            "confirm",
            json("prod", Message::Confirm(Confirm {})),
        ),
        ("cluster_frame", "heartbeat", binary(heartbeat())),
        (
            "cluster_frame",
            "invalidate",
            binary(invalidate(opt(), None)),
        ),
        (
            "cluster_frame",
            "invalidate-timed",
            binary(invalidate(opt(), Some(1_765_000_000_000))),
        ),
        (
            "cluster_frame",
            "invalidate-evict",
            binary(invalidate(
                Change::Evict {
                    group: Some(Group::FhirConnect),
                    tenant: Some("default".into()),
                    key: None,
                },
                None,
            )),
        ),
        ("cluster_frame", "leave", binary(leave())),
        ("cluster_frame", "two-frames", two),
        ("session_open", "forged", step(0, &forged)),
        (
            "session_open",
            "gap",
            [step(3, &leave_body), step(1, &leave_body)].concat(),
        ),
        (
            "session_open",
            "replay",
            [step(1, &leave_body), step(2, b"")].concat(),
        ),
        (
            "session_open",
            "seal-open",
            [step(1, &leave_body), step(1, &leave_body)].concat(),
        ),
        (
            "session_open",
            "tamper",
            [step(1, &leave_body), step(4, b"abc")].concat(),
        ),
        (
            "handshake_server",
            "hello-plain",
            with_flag(0, json("prod", Message::Hello(hello("prod", None)))),
        ),
        (
            "handshake_server",
            "other-cluster",
            with_flag(0, json("staging", Message::Hello(hello("staging", None)))),
        ),
        (
            "handshake_server",
            "reject-first",
            with_flag(0, json("prod", reject)),
        ),
    ]
}

/// Seeds with a Noise message (random each time): a keyed Hello, and one followed by a made-up
/// confirmation.
fn keyed_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let secret = ClusterSecret::new("fuzz-secret-fuzz-secret");
    let h = json("prod", Message::Hello(hello("prod", secret.as_ref())));
    let mut then_confirm = vec![1];
    then_confirm.extend_from_slice(&h);
    then_confirm.extend_from_slice(&frame(&[0x33; 48]));
    vec![
        ("handshake_server", "hello-keyed", [&[1][..], &h].concat()),
        ("handshake_server", "hello-then-confirm", then_confirm),
    ]
}

/// Seeds of an older format that the generated ones replace.
const STALE: [(&str, &str); 2] = [
    ("cluster_frame", "proof"),
    ("handshake_server", "hello-then-proof"),
];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds")
}

#[test]
fn fuzz_seeds_follow_the_wire_format() {
    let root = dir();
    if std::env::var_os("FUZZ_SEEDS_WRITE").is_some() {
        for (target, name, bytes) in seeds().into_iter().chain(keyed_seeds()) {
            std::fs::write(root.join(target).join(name), bytes).unwrap();
        }
        for (target, name) in STALE {
            let _ = std::fs::remove_file(root.join(target).join(name));
        }
        return;
    }
    let hint = "regenerate with FUZZ_SEEDS_WRITE=1 cargo test --test offline fuzz_seeds";
    for (target, name, bytes) in seeds() {
        let on_disk = std::fs::read(root.join(target).join(name))
            .unwrap_or_else(|e| panic!("fuzz/seeds/{target}/{name}: {e}; {hint}"));
        assert!(
            on_disk == bytes,
            "fuzz/seeds/{target}/{name} is stale; {hint}"
        );
    }
    for (target, name, _) in keyed_seeds() {
        let on_disk = std::fs::read(root.join(target).join(name))
            .unwrap_or_else(|e| panic!("fuzz/seeds/{target}/{name}: {e}; {hint}"));
        let (payload, _) = decode_frame(&on_disk[1..], MAX_FRAME).unwrap();
        match Envelope::decode(payload, "prod") {
            Ok(Envelope {
                body: Message::Hello(h),
                ..
            }) => assert!(h.protocol == PROTOCOL && h.noise.is_some()),
            other => panic!("fuzz/seeds/{target}/{name}: {other:?}; {hint}"),
        }
    }
    for (target, name) in STALE {
        assert!(
            !root.join(target).join(name).exists(),
            "fuzz/seeds/{target}/{name} is of an older format; {hint}"
        );
    }
}
