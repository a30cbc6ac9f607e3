//! The server side of the handshake fed arbitrary client bytes: `accept` over an in-memory
//! stream (the input is everything the client sends, then EOF), with and without a cluster
//! secret; and `server_on_hello` / `server_on_confirm` on whatever Hello the input decodes to.
//! Nothing may come up with a secret (the input cannot know it), and the server may answer only
//! with a Welcome or a Reject.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openfhir_cache::cluster::{
    accept, decode_frame, server_on_confirm, server_on_hello, ClusterSecret, Envelope, Identity,
    Message, MAX_FRAME,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let keyed = flags & 1 == 1;
    let secret = keyed.then(|| ClusterSecret::new("fuzz-secret-fuzz-secret").unwrap());
    let me = Identity::new("prod", "b", "b.cluster:7800");

    // The pure steps, on the first frame's Hello (or the whole input as one payload).
    let payload = decode_frame(input, MAX_FRAME).map_or(input, |(p, _)| p);
    if let Ok(Envelope {
        body: Message::Hello(hello),
        ..
    }) = Envelope::decode(payload, "prod")
    {
        if let Ok((welcome, pending)) = server_on_hello(&me, secret.as_ref(), &hello) {
            // The input cannot make a Noise message under the secret.
            assert!(!keyed, "a Welcome without the secret");
            assert!(welcome.noise.is_none());
            let res = server_on_confirm(pending, Some(&[flags; 40]));
            assert!(res.is_err(), "a plain session took a made-up confirmation");
        }
    }

    // The driver over a stream.
    RT.with(|rt| {
        rt.block_on(async {
            let (mut client, mut server) = tokio::io::duplex(4 * MAX_FRAME + input.len());
            client.write_all(input).await.unwrap();
            client.shutdown().await.unwrap();
            let res = accept(&mut server, &me, secret.as_ref()).await;
            assert!(
                !(keyed && res.is_ok()),
                "a session came up without the secret"
            );
            drop(server);
            let mut replies = Vec::new();
            client.read_to_end(&mut replies).await.unwrap();
            let mut rest = &replies[..];
            while !rest.is_empty() {
                let (p, r) = decode_frame(rest, MAX_FRAME).expect("whole frames");
                let env = Envelope::decode(p, "prod").expect("valid envelopes");
                assert!(matches!(env.body, Message::Welcome(_) | Message::Reject(_)));
                rest = r;
            }
        })
    });
});
