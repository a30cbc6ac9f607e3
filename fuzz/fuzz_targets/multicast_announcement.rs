//! `decode_announcement`, with and without a cluster secret (first byte), from a unicast and an
//! unspecified source address.
#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use openfhir_cache::cluster::discovery::multicast::{decode_announcement, MulticastSettings};
use openfhir_cache::cluster::ClusterSecret;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, datagram)) = data.split_first() else {
        return;
    };
    let settings = MulticastSettings {
        group: "239.255.78.0:45588".parse().unwrap(),
        bind_addr: "127.0.0.2".parse().unwrap(),
        cluster: "prod".into(),
        node_id: "b".into(),
        version: "0.1.0".into(),
        advertised: "127.0.0.2:7800".parse().unwrap(),
        secret: (flags & 1 == 1).then(|| ClusterSecret::new("fuzz-secret-fuzz-secret").unwrap()),
        interval: Duration::from_secs(1),
    };
    for src in ["192.0.2.9:40000", "0.0.0.0:0"] {
        let src: SocketAddr = src.parse().unwrap();
        if let Ok(peer) = decode_announcement(datagram, &settings, src) {
            assert!(peer.addr.port() != 0);
            assert!(!peer.addr.ip().is_unspecified() && !peer.addr.ip().is_multicast());
            assert!(peer.node_id != "b" && !peer.node_id.is_empty());
        }
    }
});
