//! Cluster frames, envelopes and session messages: `decode_frame_header`, `decode_frame` (every
//! frame of the input in turn), `read_frame` over the same bytes, and of every payload
//! `Envelope::peek_header` and `Envelope::decode` (the handshake's JSON) and `decode_body` (the
//! binary messages after it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use openfhir_cache::cluster::{
    decode_body, decode_frame, decode_frame_header, encode_body, read_frame, Envelope, WireError,
    MAX_FRAME,
};

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
}

fuzz_target!(|data: &[u8]| {
    let _ = decode_frame_header(data, MAX_FRAME);
    let _ = Envelope::peek_header(data);
    let _ = Envelope::decode(data, "prod");
    let _ = decode_body(data);

    // As a stream of frames.
    let mut rest = data;
    let mut payloads = Vec::new();
    while let Ok((payload, r)) = decode_frame(rest, MAX_FRAME) {
        assert!(!payload.is_empty() && payload.len() <= MAX_FRAME);
        payloads.push(payload);
        rest = r;
    }
    for p in &payloads {
        if let Ok(env) = Envelope::decode(p, "prod") {
            // What decodes encodes again (within the limit) and decodes to the same.
            if let Ok(bytes) = env.encode() {
                assert_eq!(Envelope::decode(&bytes, "prod").unwrap(), env);
            }
        }
        if let Ok(msg) = decode_body(p) {
            // The binary form is canonical: what decodes encodes to the same bytes.
            assert_eq!(&encode_body(&msg).unwrap()[..], *p);
        }
    }

    // The same bytes read from a stream give the same frames.
    RT.with(|rt| {
        rt.block_on(async {
            let mut r = data;
            for p in &payloads {
                assert_eq!(&read_frame(&mut r, MAX_FRAME).await.unwrap()[..], *p);
            }
            match read_frame(&mut r, MAX_FRAME).await {
                Ok(_) => panic!("read_frame found a frame decode_frame did not"),
                Err(WireError::Closed) => assert!(r.is_empty()),
                Err(_) => {}
            }
        })
    });
});
