//! Micro-benchmarks of the invalidation hot paths outside the cache: what a peer message costs
//! to build, frame, seal (encrypt) and read back, and what a NOTIFY payload costs to parse.
//!
//! The `session` group measures the Noise session (protocol 2) beside the HMAC-SHA256 session it
//! replaced (protocol 1: a MAC and a sequence number per frame, no encryption), rebuilt here from
//! its description so both run in one process on one machine.
//!
//! `cargo bench --bench cluster`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hmac::{Hmac, KeyInit, Mac};
use openfhir_cache::cache::Change;
use openfhir_cache::cluster::{
    client_on_welcome, client_start, decode_body, decode_frame, encode_body, encode_frame,
    encode_invalidate, server_on_confirm, server_on_hello, ClusterSecret, Envelope, Identity,
    Invalidate, Message, Opener, Sealer, MAX_FRAME,
};
use openfhir_cache::invalidation::parse_payload;
use sha2::Sha256;

fn invalidation(seq: u64) -> Envelope {
    Envelope::new(
        "openfhir",
        Message::Invalidate(Invalidate {
            origin: "node-a-1f2e3d4c".into(),
            seq,
            log_position: Some(812_345),
            change: Change::Opt {
                tenant: "default".into(),
                template_id: "growth_chart".into(),
            },
            at_unix_ms: Some(1_765_000_000_000),
        }),
    )
}

/// A session pair from the in-memory handshake: (client sealer, server opener).
fn keyed(secret: Option<&ClusterSecret>) -> (Sealer, Opener) {
    let (hello, cp) =
        client_start(&Identity::new("openfhir", "a", "10.0.0.1:7800"), secret).unwrap();
    let (welcome, sp) = server_on_hello(
        &Identity::new("openfhir", "b", "10.0.0.2:7800"),
        secret,
        &hello,
    )
    .unwrap();
    let (confirm, client) = client_on_welcome(cp, &welcome).unwrap();
    let server = server_on_confirm(sp, confirm.as_deref()).unwrap();
    let (_, sealer, _) = client.into_parts();
    let (_, _, opener) = server.into_parts();
    (sealer, opener)
}

fn bench(c: &mut Criterion) {
    let env = invalidation(1);
    let json = env.encode().unwrap();
    let frame = encode_frame(&json).unwrap();

    let body = encode_body(&env.body).unwrap();
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.bench_function("envelope_encode", |b| {
        b.iter(|| black_box(&env).encode().unwrap())
    });
    g.bench_function("envelope_decode", |b| {
        b.iter(|| Envelope::decode(black_box(&json), "openfhir").unwrap())
    });
    g.bench_function("binary_encode", |b| {
        b.iter(|| encode_body(black_box(&env.body)).unwrap())
    });
    g.bench_function("binary_decode", |b| {
        b.iter(|| decode_body(black_box(&body)).unwrap())
    });
    g.bench_function("frame_encode", |b| {
        b.iter(|| encode_frame(black_box(&json)).unwrap())
    });
    g.bench_function("frame_decode", |b| {
        b.iter(|| decode_frame(black_box(&frame), MAX_FRAME).unwrap())
    });
    g.finish();

    let secret = ClusterSecret::new("bench-secret-0123456789abcdef").unwrap();
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Bytes(json.len() as u64));
    let mut v1 = V1Session::new(b"bench-session-key");
    g.bench_function("v1_hmac_seal", |b| b.iter(|| v1.seal(black_box(&json))));
    let mut v1 = V1Session::new(b"bench-session-key");
    g.bench_function("v1_hmac_seal_then_open", |b| {
        b.iter(|| {
            let f = v1.seal(black_box(&json));
            v1.open(&f).len()
        })
    });
    let (mut sealer, _) = keyed(Some(&secret));
    g.bench_function("v2_noise_seal", |b| {
        b.iter(|| sealer.seal(black_box(&json)).unwrap())
    });
    let (mut sealer, mut opener) = keyed(Some(&secret));
    g.bench_function("v2_noise_seal_then_open", |b| {
        b.iter(|| {
            let f = sealer.seal(black_box(&json)).unwrap();
            opener.open(&f).map(<[u8]>::len).unwrap()
        })
    });
    let (mut sealer, mut opener) = keyed(None);
    g.bench_function("plain_seal_then_open", |b| {
        b.iter(|| {
            let f = sealer.seal(black_box(&json)).unwrap();
            opener.open(&f).map(<[u8]>::len).unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("handshake");
    g.bench_function("v2_noise_handshake", |b| b.iter(|| keyed(Some(&secret))));
    g.bench_function("plain_handshake", |b| b.iter(|| keyed(None)));
    g.finish();

    // What a sender does per peer message and a receiver per frame, end to end (no socket):
    // protocol 2's JSON envelope (the baseline, as that release sent it) against protocol 3's
    // binary body, encoded from the borrowed change as `Cluster::broadcast` does.
    let mut g = c.benchmark_group("peer_message");
    let (mut sealer, mut opener) = keyed(Some(&secret));
    g.bench_function("v2_json_build_seal_frame_open_decode", |b| {
        let mut seq = 0;
        b.iter(|| {
            seq += 1;
            let json = invalidation(seq).encode().unwrap();
            let frame = encode_frame(&sealer.seal(&json).unwrap()).unwrap();
            let (payload, _) = decode_frame(&frame, MAX_FRAME).unwrap();
            Envelope::decode(opener.open(payload).unwrap(), "openfhir").unwrap()
        })
    });
    let (mut sealer, mut opener) = keyed(Some(&secret));
    let change = Change::Opt {
        tenant: "default".into(),
        template_id: "growth_chart".into(),
    };
    let mut frame = Vec::new();
    g.bench_function("v3_binary_build_seal_frame_open_decode", |b| {
        let mut seq = 0;
        b.iter(|| {
            seq += 1;
            let mut body = Vec::with_capacity(64);
            encode_invalidate(
                &mut body,
                "node-a-1f2e3d4c",
                seq,
                Some(812_345),
                &change,
                Some(1_765_000_000_000),
            )
            .unwrap();
            frame.clear();
            sealer.seal_frame_into(&body, &mut frame).unwrap();
            let (payload, _) = decode_frame(&frame, MAX_FRAME).unwrap();
            decode_body(opener.open(payload).unwrap()).unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("notify");
    let payload = r#"{"p":812345,"x":"7731","g":"opt","t":"default","k":"growth_chart","o":"UPDATE","n":"node-a-1f2e3d4c"}"#;
    g.bench_function("parse_payload", |b| {
        b.iter(|| parse_payload(black_box(payload)).unwrap())
    });
    g.finish();
}

/// Protocol 1's session frames, as that release sealed them: `[HMAC-SHA256(key, direction || seq
/// || json)][seq][json]`, checked on open (MAC first, then the sequence number).
struct V1Session {
    key: Vec<u8>,
    sent: u64,
    received: u64,
}

impl V1Session {
    fn new(key: &[u8]) -> V1Session {
        V1Session {
            key: key.to_vec(),
            sent: 0,
            received: 0,
        }
    }

    fn mac(&self, seq: &[u8], json: &[u8]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).unwrap();
        m.update(b"C");
        m.update(seq);
        m.update(json);
        m
    }

    fn seal(&mut self, json: &[u8]) -> Vec<u8> {
        self.sent += 1;
        let seq = self.sent.to_be_bytes();
        let tag = self.mac(&seq, json).finalize().into_bytes();
        let mut out = Vec::with_capacity(40 + json.len());
        out.extend_from_slice(&tag);
        out.extend_from_slice(&seq);
        out.extend_from_slice(json);
        out
    }

    fn open<'a>(&mut self, frame: &'a [u8]) -> &'a [u8] {
        let (tag, rest) = frame.split_at(32);
        let (seq, json) = rest.split_at(8);
        self.mac(seq, json).verify_slice(tag).unwrap();
        let seq = u64::from_be_bytes(seq.try_into().unwrap());
        assert_eq!(seq, self.received + 1);
        self.received = seq;
        json
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
