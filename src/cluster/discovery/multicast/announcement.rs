//! The announcement datagram: its JSON shape, its MAC, and the total decoder that checks a
//! received one against this node's settings.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::{MulticastSettings, MAX_ANNOUNCEMENT};
use crate::cluster::wire::{Tag, MAGIC, PROTOCOL};
use crate::cluster::ClusterSecret;

/// Why an announcement was not used (or could not be made).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AnnounceError {
    /// The datagram (or the announcement to send) exceeds [`MAX_ANNOUNCEMENT`].
    #[error("announcement of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON of the announcement's shape (unknown fields included), or an empty field.
    #[error("malformed announcement: {0}")]
    Malformed(String),
    /// Not an openfhir-cache announcement.
    #[error("bad magic number {got:#010x} (expected {MAGIC:#010x})")]
    BadMagic {
        /// The magic number received.
        got: u32,
    },
    /// Another cluster protocol version.
    #[error("unsupported cluster protocol version {got} (this node speaks {PROTOCOL})")]
    UnsupportedProtocol {
        /// The version received.
        got: u16,
    },
    /// This node's own announcement, looped back.
    #[error("own announcement")]
    Own,
    /// An announcement of another cluster.
    #[error("announcement for cluster {theirs:?}, but this node is in cluster {ours:?}")]
    WrongCluster {
        /// This node's cluster name.
        ours: String,
        /// The cluster name announced.
        theirs: String,
    },
    /// This node has a secret and the announcement carries no MAC.
    #[error("unsigned announcement, but this node has a CLUSTER_SECRET")]
    MissingMac,
    /// The MAC does not match: forged, tampered, or signed with another secret.
    #[error("announcement authentication failed (bad MAC)")]
    BadMac,
    /// The announced address is not a usable `ip:port`.
    #[error("bad announced address {addr:?}: {reason}")]
    BadAddr {
        /// The address as announced.
        addr: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A peer learnt from a valid announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// Its node id.
    pub node_id: String,
    /// Its release (not checked here; the handshake refuses a mismatch).
    pub version: String,
    /// Its cluster address, the unspecified IP already replaced by the datagram's source IP.
    pub addr: SocketAddr,
}

/// The JSON datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Announcement {
    magic: u32,
    protocol: u16,
    cluster: String,
    node_id: String,
    version: String,
    addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<Tag>,
}

impl Announcement {
    /// The canonical MAC input after the label: magic and protocol big-endian, then each string
    /// field prefixed with its length as a big-endian `u64`.
    fn mac_input(&self) -> Vec<u8> {
        let strings = [&self.cluster, &self.node_id, &self.version, &self.addr];
        let mut out = Vec::with_capacity(6 + strings.iter().map(|s| 8 + s.len()).sum::<usize>());
        out.extend_from_slice(&self.magic.to_be_bytes());
        out.extend_from_slice(&self.protocol.to_be_bytes());
        for s in strings {
            out.extend_from_slice(&(s.len() as u64).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out
    }

    fn sign(&mut self, secret: &ClusterSecret) {
        self.mac = Some(Tag(secret.mac(&[b"announce", &self.mac_input()])));
    }

    fn verify(&self, secret: &ClusterSecret) -> Result<(), AnnounceError> {
        let mac = self.mac.as_ref().ok_or(AnnounceError::MissingMac)?;
        if secret.verify(&[b"announce", &self.mac_input()], &mac.0) {
            Ok(())
        } else {
            Err(AnnounceError::BadMac)
        }
    }
}

/// The announcement datagram of this node: its cluster, node id, release and advertised address,
/// signed when `settings.secret` is set.
///
/// Fails with [`AnnounceError::TooLarge`] when the names are so long that the datagram would
/// exceed [`MAX_ANNOUNCEMENT`] (every receiver would drop it).
pub fn encode_announcement(settings: &MulticastSettings) -> Result<Vec<u8>, AnnounceError> {
    let mut a = Announcement {
        magic: MAGIC,
        protocol: PROTOCOL,
        cluster: settings.cluster.clone(),
        node_id: settings.node_id.clone(),
        version: settings.version.clone(),
        addr: settings.advertised.to_string(),
        mac: None,
    };
    if let Some(secret) = &settings.secret {
        a.sign(secret);
    }
    let bytes = serde_json::to_vec(&a).map_err(|e| AnnounceError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_ANNOUNCEMENT {
        return Err(AnnounceError::TooLarge {
            len: bytes.len(),
            max: MAX_ANNOUNCEMENT,
        });
    }
    Ok(bytes)
}

/// Checks a received datagram against this node's `settings` and returns the peer it announces.
///
/// Checks, in order: size, JSON shape, magic, protocol, own node id, cluster name, MAC (only when
/// this node has a secret), then the address (an `ip:port` with a non-zero port and a unicast IP;
/// an unspecified IP is replaced by `src`'s). Total: any bytes give a peer or an
/// [`AnnounceError`], never a panic.
pub fn decode_announcement(
    bytes: &[u8],
    settings: &MulticastSettings,
    src: SocketAddr,
) -> Result<Announced, AnnounceError> {
    if bytes.len() > MAX_ANNOUNCEMENT {
        return Err(AnnounceError::TooLarge {
            len: bytes.len(),
            max: MAX_ANNOUNCEMENT,
        });
    }
    let a: Announcement =
        serde_json::from_slice(bytes).map_err(|e| AnnounceError::Malformed(e.to_string()))?;
    if a.magic != MAGIC {
        return Err(AnnounceError::BadMagic { got: a.magic });
    }
    if a.protocol != PROTOCOL {
        return Err(AnnounceError::UnsupportedProtocol { got: a.protocol });
    }
    crate::cluster::check_node_id(&a.node_id).map_err(AnnounceError::Malformed)?;
    if a.node_id == settings.node_id {
        return Err(AnnounceError::Own);
    }
    if a.cluster != settings.cluster {
        return Err(AnnounceError::WrongCluster {
            ours: settings.cluster.clone(),
            theirs: a.cluster,
        });
    }
    if let Some(secret) = &settings.secret {
        a.verify(secret)?;
    }
    let bad = |reason| AnnounceError::BadAddr {
        addr: a.addr.clone(),
        reason,
    };
    let mut addr: SocketAddr = a.addr.parse().map_err(|_| bad("not an ip:port"))?;
    if addr.port() == 0 {
        return Err(bad("port 0"));
    }
    let ip = addr.ip();
    if ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(bad("not a unicast address"));
    }
    if ip.is_unspecified() {
        if src.ip().is_unspecified() || src.ip().is_multicast() {
            return Err(bad("unspecified, and so is the source address"));
        }
        // The source as received, port replaced: an `fe80::` source keeps its zone index, without
        // which it could not be dialed.
        let port = addr.port();
        addr = src;
        addr.set_port(port);
    }
    Ok(Announced {
        node_id: a.node_id,
        version: a.version,
        addr,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::settings;
    use super::*;
    use proptest::prelude::*;

    fn src() -> SocketAddr {
        "192.0.2.9:40000".parse().unwrap()
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    fn bytes(v: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    #[test]
    fn round_trip_without_secret() {
        let a = encode_announcement(&settings("a", None)).unwrap();
        assert!(a.len() < 1024);
        let v = json(&a);
        assert_eq!(v["magic"], MAGIC);
        assert_eq!(v["protocol"], PROTOCOL);
        assert_eq!(v["addr"], "127.0.0.2:7800");
        assert!(v.get("mac").is_none());
        let got = decode_announcement(&a, &settings("b", None), src()).unwrap();
        assert_eq!(
            got,
            Announced {
                node_id: "a".into(),
                version: "0.1.0".into(),
                addr: "127.0.0.2:7800".parse().unwrap(),
            }
        );
    }

    #[test]
    fn own_announcement_and_other_clusters_are_ignored() {
        let a = encode_announcement(&settings("a", None)).unwrap();
        assert_eq!(
            decode_announcement(&a, &settings("a", None), src()),
            Err(AnnounceError::Own)
        );
        let mut other = settings("b", None);
        other.cluster = "test".into();
        assert_eq!(
            decode_announcement(&a, &other, src()),
            Err(AnnounceError::WrongCluster {
                ours: "test".into(),
                theirs: "prod".into()
            })
        );
    }

    #[test]
    fn a_receiver_with_a_secret_requires_a_valid_mac() {
        let signed = encode_announcement(&settings("a", Some("s3cret"))).unwrap();
        let v = json(&signed);
        assert_eq!(v["mac"].as_str().unwrap().len(), 64);
        let me = settings("b", Some("s3cret"));
        assert!(decode_announcement(&signed, &me, src()).is_ok());

        let unsigned = encode_announcement(&settings("a", None)).unwrap();
        assert_eq!(
            decode_announcement(&unsigned, &me, src()),
            Err(AnnounceError::MissingMac)
        );
        let other_key = encode_announcement(&settings("a", Some("other"))).unwrap();
        assert_eq!(
            decode_announcement(&other_key, &me, src()),
            Err(AnnounceError::BadMac)
        );
        // Every signed field is covered.
        for (field, value) in [
            ("addr", serde_json::json!("10.0.0.1:7800")),
            ("node_id", serde_json::json!("c")),
            ("version", serde_json::json!("9.9.9")),
        ] {
            let mut t = v.clone();
            t[field] = value;
            assert_eq!(
                decode_announcement(&bytes(&t), &me, src()),
                Err(AnnounceError::BadMac),
                "{field}"
            );
        }
        let mut t = v.clone();
        let mut mac = t["mac"].as_str().unwrap().to_string();
        let last = if mac.ends_with('0') { "1" } else { "0" };
        mac.replace_range(63.., last);
        t["mac"] = mac.into();
        assert_eq!(
            decode_announcement(&bytes(&t), &me, src()),
            Err(AnnounceError::BadMac)
        );
    }

    #[test]
    fn a_receiver_without_a_secret_accepts_signed_announcements() {
        let signed = encode_announcement(&settings("a", Some("s3cret"))).unwrap();
        assert!(decode_announcement(&signed, &settings("b", None), src()).is_ok());
    }

    #[test]
    fn length_prefixes_keep_field_boundaries_in_the_mac() {
        let k = ClusterSecret::new("k").unwrap();
        let mut s1 = settings("ab", None);
        s1.cluster = "c".into();
        let mut s2 = settings("b", None);
        s2.cluster = "ca".into();
        s1.secret = Some(k.clone());
        s2.secret = Some(k);
        let v1 = json(&encode_announcement(&s1).unwrap());
        let v2 = json(&encode_announcement(&s2).unwrap());
        assert_ne!(v1["mac"], v2["mac"]);
    }

    #[test]
    fn unspecified_ip_is_replaced_by_the_source() {
        let mut s = settings("a", None);
        s.advertised = "0.0.0.0:7800".parse().unwrap();
        let a = encode_announcement(&s).unwrap();
        let got = decode_announcement(&a, &settings("b", None), src()).unwrap();
        assert_eq!(got.addr, "192.0.2.9:7800".parse::<SocketAddr>().unwrap());

        s.advertised = "[::]:7801".parse().unwrap();
        let a = encode_announcement(&s).unwrap();
        let v6src: SocketAddr = "[fd00::5]:1234".parse().unwrap();
        let got = decode_announcement(&a, &settings("b", None), v6src).unwrap();
        assert_eq!(got.addr, "[fd00::5]:7801".parse::<SocketAddr>().unwrap());

        let linklocal = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::5".parse().unwrap(),
            1234,
            0,
            3,
        ));
        let got = decode_announcement(&a, &settings("b", None), linklocal).unwrap();
        assert_eq!(got.addr.to_string(), "[fe80::5%3]:7801");

        s.advertised = "[fd00::7]:7802".parse().unwrap();
        let a = encode_announcement(&s).unwrap();
        let got = decode_announcement(&a, &settings("b", None), src()).unwrap();
        assert_eq!(got.addr, "[fd00::7]:7802".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn wrong_magic_protocol_shape_and_addresses_are_refused() {
        let me = settings("b", None);
        let v = json(&encode_announcement(&settings("a", None)).unwrap());
        let with = |field: &str, value: serde_json::Value| {
            let mut t = v.clone();
            t[field] = value;
            decode_announcement(&bytes(&t), &me, src())
        };
        assert_eq!(
            with("magic", 0.into()),
            Err(AnnounceError::BadMagic { got: 0 })
        );
        assert_eq!(
            with("protocol", 9.into()),
            Err(AnnounceError::UnsupportedProtocol { got: 9 })
        );
        assert!(matches!(
            with("extra", 1.into()),
            Err(AnnounceError::Malformed(_))
        ));
        for bad in ["", "evil\"} 1\nforged 1", "a b", &"x".repeat(65)] {
            assert!(
                matches!(
                    with("node_id", bad.into()),
                    Err(AnnounceError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            with("mac", "zz".into()),
            Err(AnnounceError::Malformed(_))
        ));
        for addr in [
            "node-a:7800",
            "127.0.0.1",
            "127.0.0.1:0",
            "239.255.78.0:7800",
            "255.255.255.255:7800",
            "",
        ] {
            assert!(
                matches!(
                    with("addr", addr.into()),
                    Err(AnnounceError::BadAddr { .. })
                ),
                "{addr}"
            );
        }
        let mut t = v.clone();
        t.as_object_mut().unwrap().remove("addr");
        assert!(matches!(
            decode_announcement(&bytes(&t), &me, src()),
            Err(AnnounceError::Malformed(_))
        ));
        // A release mismatch is left to the handshake.
        assert!(with("version", "9.9.9".into()).is_ok());
    }

    #[test]
    fn oversized_datagrams_and_announcements_are_refused() {
        let big = vec![b' '; MAX_ANNOUNCEMENT + 1];
        assert!(matches!(
            decode_announcement(&big, &settings("b", None), src()),
            Err(AnnounceError::TooLarge { .. })
        ));
        let mut s = settings("a", None);
        s.cluster = "x".repeat(MAX_ANNOUNCEMENT);
        assert!(matches!(
            encode_announcement(&s),
            Err(AnnounceError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = decode_announcement(&data, &settings("b", Some("k")), src());
            let _ = decode_announcement(&data, &settings("b", None), src());
        }

        #[test]
        fn arbitrary_json_shapes_never_panic(
            magic in prop_oneof![Just(MAGIC), any::<u32>()],
            protocol in prop_oneof![Just(PROTOCOL), any::<u16>()],
            cluster in prop_oneof![Just("prod".to_string()), ".{0,8}"],
            node_id in ".{0,8}",
            addr in prop_oneof![".{0,24}", "[0-9.]{1,15}:[0-9]{1,6}", "\\[[0-9a-f:]{0,20}\\]:[0-9]{1,6}"],
            mac in proptest::option::of("[0-9a-fA-F]{64}|.{0,70}"),
        ) {
            let mut v = serde_json::json!({
                "magic": magic, "protocol": protocol, "cluster": cluster,
                "node_id": node_id, "version": "0.1.0", "addr": addr,
            });
            if let Some(m) = mac {
                v["mac"] = m.into();
            }
            let data = bytes(&v);
            for me in [settings("b", Some("k")), settings("b", None)] {
                if let Ok(a) = decode_announcement(&data, &me, src()) {
                    prop_assert!(a.addr.port() != 0);
                    prop_assert!(!a.addr.ip().is_unspecified());
                    prop_assert!(a.node_id != "b");
                    prop_assert!(crate::cluster::check_node_id(&a.node_id).is_ok());
                }
            }
        }

        #[test]
        fn any_single_byte_change_of_a_signed_announcement_is_refused_or_equal(
            pos in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let a = encode_announcement(&settings("a", Some("k"))).unwrap();
            let me = settings("b", Some("k"));
            let original = decode_announcement(&a, &me, src()).unwrap();
            let mut t = a.clone();
            let i = pos.index(t.len());
            t[i] = byte;
            // Either refused, or it decodes to the very same peer (e.g. a hex digit's case, or
            // JSON whitespace).
            if let Ok(got) = decode_announcement(&t, &me, src()) {
                prop_assert_eq!(got, original);
            }
        }
    }
}
