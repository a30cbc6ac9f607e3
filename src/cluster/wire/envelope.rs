//! The envelope around every message: magic number, protocol version and cluster name, checked
//! in that order when decoding.

use serde::{Deserialize, Serialize};

use super::frame::check_len;
use super::{Message, WireError, MAGIC, MAX_FRAME, PROTOCOL};

fn check_magic_and_protocol(magic: u32, protocol: u16) -> Result<(), WireError> {
    if magic != MAGIC {
        return Err(WireError::BadMagic { got: magic });
    }
    if protocol != PROTOCOL {
        return Err(WireError::UnsupportedProtocol { got: protocol });
    }
    Ok(())
}

/// What wraps every message: magic number, protocol version and cluster name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// [`MAGIC`].
    pub magic: u32,
    /// [`PROTOCOL`].
    pub protocol: u16,
    /// The sender's cluster name.
    pub cluster: String,
    /// The message.
    pub body: Message,
}

/// The fields every protocol version keeps: read first, so an envelope of another version (whose
/// body this release cannot parse) is still reported as [`WireError::UnsupportedProtocol`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EnvelopeHeader {
    /// The magic number.
    pub magic: u32,
    /// The protocol version.
    pub protocol: u16,
    /// The cluster name.
    pub cluster: String,
}

impl Envelope {
    /// `body` for cluster `cluster`, with this release's [`MAGIC`] and [`PROTOCOL`].
    pub fn new(cluster: impl Into<String>, body: Message) -> Envelope {
        Envelope {
            magic: MAGIC,
            protocol: PROTOCOL,
            cluster: cluster.into(),
            body,
        }
    }

    /// The envelope as JSON bytes, refused if longer than [`MAX_FRAME`].
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let bytes = serde_json::to_vec(self).map_err(|e| WireError::Malformed(e.to_string()))?;
        check_len(bytes.len(), MAX_FRAME)?;
        Ok(bytes)
    }

    /// Reads only magic, protocol and cluster (see [`EnvelopeHeader`]), checking the size first.
    pub fn peek_header(bytes: &[u8]) -> Result<EnvelopeHeader, WireError> {
        check_len(bytes.len(), MAX_FRAME)?;
        serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))
    }

    /// Decodes an envelope sent to cluster `cluster`, checking in this order: size
    /// ([`WireError::Empty`], [`WireError::TooLarge`]), magic ([`WireError::BadMagic`]), protocol
    /// ([`WireError::UnsupportedProtocol`]), the message itself ([`WireError::Malformed`]), and the
    /// cluster name ([`WireError::WrongCluster`]).
    ///
    /// The cluster name of a [`Message::Hello`] or [`Message::Reject`] is not checked here: the
    /// handshake checks the Hello's and answers with a [`RejectReason::ClusterName`] that names
    /// both clusters, and a Reject is accepted from any cluster so the refused node can log why.
    ///
    /// [`RejectReason::ClusterName`]: super::RejectReason::ClusterName
    pub fn decode(bytes: &[u8], cluster: &str) -> Result<Envelope, WireError> {
        check_len(bytes.len(), MAX_FRAME)?;
        // One parse for a well-formed envelope (every frame of a healthy peer); only when it
        // fails is the header read on its own, so that a foreign service or another release is
        // named as such rather than as malformed. Both orders give the same answer.
        let env: Envelope = match serde_json::from_slice(bytes) {
            Ok(env) => env,
            Err(e) => {
                let header = Envelope::peek_header(bytes)?;
                check_magic_and_protocol(header.magic, header.protocol)?;
                return Err(WireError::Malformed(e.to_string()));
            }
        };
        check_magic_and_protocol(env.magic, env.protocol)?;
        let exempt = matches!(env.body, Message::Hello(_) | Message::Reject(_));
        if !exempt && env.cluster != cluster {
            return Err(WireError::WrongCluster {
                ours: cluster.to_string(),
                theirs: env.cluster,
            });
        }
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        Card, Confirm, Heartbeat, Hello, Invalidate, Leave, Reject, RejectReason, Sealed, Welcome,
    };
    use super::*;
    use crate::cache::Change;

    fn hello() -> Hello {
        Hello {
            magic: MAGIC,
            protocol: PROTOCOL,
            cluster: "prod".into(),
            version: "0.1.0".into(),
            card: None,
            noise: Some(Sealed(vec![7; 48])),
        }
    }

    fn invalidate() -> Message {
        Message::Invalidate(Invalidate {
            origin: "n1".into(),
            seq: 42,
            log_position: Some(9),
            change: Change::Opt {
                tenant: "default".into(),
                template_id: "growth_chart".into(),
            },
            at_unix_ms: Some(1_765_000_000_000),
        })
    }

    #[test]
    fn envelope_round_trips_every_message() {
        let bodies = vec![
            Message::Hello(hello()),
            Message::Welcome(Welcome {
                magic: MAGIC,
                protocol: PROTOCOL,
                cluster: "prod".into(),
                version: "0.1.0".into(),
                card: Some(Card {
                    node_id: "n2".into(),
                    advertised_addr: "[::1]:7800".into(),
                }),
                noise: None,
            }),
            Message::Reject(Reject {
                reason: RejectReason::Version {
                    ours: "0.1.0".into(),
                    theirs: "0.2.0".into(),
                },
                message: "no".into(),
            }),
            Message::Confirm(Confirm {}),
            invalidate(),
            Message::Heartbeat(Heartbeat {
                origin: "n1".into(),
                seq: 1,
                at_unix_ms: 1_700_000_000_000,
                peers: vec![
                    "10.0.0.2:7800".parse().unwrap(),
                    "[fd00::3]:7800".parse().unwrap(),
                ],
            }),
            Message::Leave(Leave {
                origin: "n1".into(),
            }),
        ];
        for body in bodies {
            let env = Envelope::new("prod", body);
            let bytes = env.encode().unwrap();
            assert_eq!(Envelope::decode(&bytes, "prod").unwrap(), env);
        }
    }

    #[test]
    fn json_shape_is_tagged_snake_case_with_hex_noise() {
        let v: serde_json::Value = serde_json::from_slice(
            &Envelope::new("prod", Message::Hello(hello()))
                .encode()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(v["magic"], 0x4F46_4331);
        assert_eq!(v["protocol"], PROTOCOL);
        assert_eq!(v["body"]["type"], "hello");
        assert_eq!(v["body"]["noise"], "07".repeat(48));
        let v = serde_json::to_value(invalidate()).unwrap();
        assert_eq!(v["type"], "invalidate");
        assert_eq!(v["change"]["kind"], "opt");
    }

    #[test]
    fn decode_checks_magic_then_protocol_then_cluster() {
        let good = Envelope::new("prod", invalidate());
        let mut v = serde_json::to_value(&good).unwrap();
        v["magic"] = 1.into();
        v["protocol"] = 9.into(); // magic is reported first
        let err = Envelope::decode(&serde_json::to_vec(&v).unwrap(), "prod").unwrap_err();
        assert!(matches!(err, WireError::BadMagic { got: 1 }), "{err}");

        v["magic"] = MAGIC.into();
        v["body"] = serde_json::json!({"type": "from_the_future"});
        let err = Envelope::decode(&serde_json::to_vec(&v).unwrap(), "prod").unwrap_err();
        assert!(
            matches!(err, WireError::UnsupportedProtocol { got: 9 }),
            "{err}"
        );

        let err = Envelope::decode(&good.encode().unwrap(), "test").unwrap_err();
        match err {
            WireError::WrongCluster { ours, theirs } => {
                assert_eq!((ours.as_str(), theirs.as_str()), ("test", "prod"))
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn hello_and_reject_pass_the_cluster_check() {
        let env = Envelope::new("other", Message::Hello(hello()));
        assert!(Envelope::decode(&env.encode().unwrap(), "prod").is_ok());
        let env = Envelope::new(
            "other",
            Message::Reject(Reject {
                reason: RejectReason::Auth,
                message: "x".into(),
            }),
        );
        assert!(Envelope::decode(&env.encode().unwrap(), "prod").is_ok());
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let mut v = serde_json::to_value(Envelope::new("prod", invalidate())).unwrap();
        v["body"]["extra"] = 1.into();
        let unknown_field = serde_json::to_vec(&v).unwrap();
        let mut v = serde_json::to_value(Envelope::new("prod", Message::Hello(hello()))).unwrap();
        v["body"]["noise"] = "abc".into();
        let short_nonce = serde_json::to_vec(&v).unwrap();
        for bad in [
            &b"not json"[..],
            b"{}",
            b"[1,2,3]",
            br#"{"magic":1330004785,"protocol":3,"cluster":"prod"}"#,
            br#"{"magic":1330004785,"protocol":3,"cluster":"prod","body":{"type":"nope"}}"#,
            &unknown_field,
            &short_nonce,
        ] {
            let err = Envelope::decode(bad, "prod").unwrap_err();
            assert!(matches!(err, WireError::Malformed(_)), "{err}");
        }
        assert!(matches!(
            Envelope::decode(b"", "prod"),
            Err(WireError::Empty)
        ));
        let huge = vec![b' '; MAX_FRAME + 1];
        assert!(matches!(
            Envelope::decode(&huge, "prod"),
            Err(WireError::TooLarge { len, max: MAX_FRAME }) if len == MAX_FRAME + 1
        ));
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
        let mut s = "[".repeat(30_000);
        s.push_str(&"]".repeat(30_000));
        assert!(matches!(
            Envelope::decode(s.as_bytes(), "prod"),
            Err(WireError::Malformed(_))
        ));
    }
}
