//! Micro-benchmarks of the invalidation hot paths outside the cache: what a peer message costs
//! to build, frame, seal (MAC) and read back, and what a NOTIFY payload costs to parse.
//!
//! `cargo bench --bench cluster`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use openfhir_cache::cache::Change;
use openfhir_cache::cluster::{
    client_on_welcome, client_start, decode_frame, encode_frame, server_on_hello, server_on_proof,
    ClusterSecret, Envelope, Identity, Invalidate, Message, Opener, Sealer, MAX_FRAME,
};
use openfhir_cache::invalidation::parse_payload;

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
        }),
    )
}

/// A session pair from the in-memory handshake: (client sealer, server opener).
fn keyed(secret: Option<&ClusterSecret>) -> (Sealer, Opener) {
    let (hello, cp) = client_start(&Identity::new("openfhir", "a", "10.0.0.1:7800"), secret);
    let (welcome, sp) = server_on_hello(
        &Identity::new("openfhir", "b", "10.0.0.2:7800"),
        secret,
        &hello,
    )
    .unwrap();
    let (proof, client) = client_on_welcome(cp, &welcome).unwrap();
    let server = server_on_proof(sp, proof.as_ref()).unwrap();
    let (_, sealer, _) = client.into_parts();
    let (_, _, opener) = server.into_parts();
    (sealer, opener)
}

fn bench(c: &mut Criterion) {
    let env = invalidation(1);
    let json = env.encode().unwrap();
    let frame = encode_frame(&json).unwrap();

    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.bench_function("envelope_encode", |b| {
        b.iter(|| black_box(&env).encode().unwrap())
    });
    g.bench_function("envelope_decode", |b| {
        b.iter(|| Envelope::decode(black_box(&json), "openfhir").unwrap())
    });
    g.bench_function("frame_encode", |b| {
        b.iter(|| encode_frame(black_box(&json)).unwrap())
    });
    g.bench_function("frame_decode", |b| {
        b.iter(|| decode_frame(black_box(&frame), MAX_FRAME).unwrap())
    });
    g.finish();

    let secret = ClusterSecret::new("bench-secret-0123456789abcdef").unwrap();
    let mut g = c.benchmark_group("mac");
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.bench_function("hmac_sha256", |b| {
        b.iter(|| secret.mac(&[b"frame", black_box(&json)]))
    });
    let (mut sealer, _) = keyed(Some(&secret));
    g.bench_function("seal", |b| {
        b.iter(|| sealer.seal(black_box(&json)).unwrap())
    });
    let (mut sealer, mut opener) = keyed(Some(&secret));
    g.bench_function("seal_then_open", |b| {
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

    // What a sender does per peer message and a receiver per frame, end to end (no socket).
    let mut g = c.benchmark_group("peer_message");
    let (mut sealer, mut opener) = keyed(Some(&secret));
    g.bench_function("build_seal_frame_open_decode", |b| {
        let mut seq = 0;
        b.iter(|| {
            seq += 1;
            let json = invalidation(seq).encode().unwrap();
            let frame = encode_frame(&sealer.seal(&json).unwrap()).unwrap();
            let (payload, _) = decode_frame(&frame, MAX_FRAME).unwrap();
            Envelope::decode(opener.open(payload).unwrap(), "openfhir").unwrap()
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

criterion_group!(benches, bench);
criterion_main!(benches);
