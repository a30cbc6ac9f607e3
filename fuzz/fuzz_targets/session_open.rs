//! `Opener::open` with session keys, driven by a little program in the input. Each step is an
//! opcode byte, a length byte and that many bytes:
//!
//! * 0: open the bytes as a frame (forged: must be refused);
//! * 1: seal the bytes with the peer's sealer and open the result (must give the bytes back,
//!   unless the sealer refused them);
//! * 2: open the last frame opened again (a replay: must be refused);
//! * 3: seal and drop (every later sealed frame opens with a gap: must be refused);
//! * 4: flip a bit of the last frame opened and open it (must be refused).
//!
//! Opened payloads are also run through `decode_body` (the session's binary messages).
#![no_main]

use libfuzzer_sys::fuzz_target;
use openfhir_cache::cluster::{
    client_on_welcome, client_start, decode_body, server_on_confirm, server_on_hello,
    ClusterSecret, Identity, Session,
};

fn keyed_pair() -> (Session, Session) {
    let secret = ClusterSecret::new("fuzz-secret-fuzz-secret");
    let (hello, cp) =
        client_start(&Identity::new("prod", "a", "a:7800"), secret.as_ref()).unwrap();
    let (welcome, sp) = server_on_hello(
        &Identity::new("prod", "b", "b:7800"),
        secret.as_ref(),
        &hello,
    )
    .unwrap();
    let (confirm, client) = client_on_welcome(cp, &welcome).unwrap();
    let server = server_on_confirm(sp, confirm.as_deref()).unwrap();
    (client, server)
}

fuzz_target!(|data: &[u8]| {
    let (mut client, mut server) = keyed_pair();
    let mut last: Option<Vec<u8>> = None;
    let mut gap = false;
    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (bytes, r) = tail.split_at(n);
        rest = r;
        let accepted_before = server.opener.opened();
        match op % 5 {
            0 => {
                assert!(server.opener.open(bytes).is_err(), "a forged frame opened");
                assert_eq!(server.opener.opened(), accepted_before);
            }
            1 | 3 => {
                let Ok(frame) = client.sealer.seal(bytes) else {
                    continue;
                };
                if op % 5 == 3 {
                    gap = true;
                    continue;
                }
                match server.opener.open(&frame) {
                    Ok(p) => {
                        assert!(!gap, "a frame after a gap opened");
                        assert_eq!(p, bytes);
                        let _ = decode_body(p);
                    }
                    Err(e) => assert!(gap && e.is_security(), "{e}"),
                }
                last = Some(frame);
            }
            2 => {
                if let Some(f) = &last {
                    assert!(server.opener.open(f).is_err(), "a replay opened");
                }
            }
            _ => {
                if let Some(f) = &last {
                    let mut f = f.clone();
                    let i = n % f.len();
                    f[i] ^= 1 << (n % 8);
                    assert!(server.opener.open(&f).is_err(), "a tampered frame opened");
                }
            }
        }
    }
});
