//! The binary codec's round trips and refusals.

use super::*;

fn samples() -> Vec<Message> {
    let inv = |change: Change, log_position, at_unix_ms| {
        Message::Invalidate(Invalidate {
            origin: "node-a".into(),
            seq: u64::MAX - 1,
            log_position,
            change,
            at_unix_ms,
        })
    };
    vec![
        inv(
            Change::Opt {
                tenant: "default".into(),
                template_id: "growth_chart".into(),
            },
            Some(-5),
            Some(1_765_000_000_000),
        ),
        inv(
            Change::Context {
                tenant: "t".into(),
                template_id: "é ü".into(),
            },
            None,
            Some(1),
        ),
        inv(
            Change::Model {
                tenant: String::new(),
                name: "m".into(),
            },
            Some(9),
            None,
        ),
        inv(
            Change::Tenant {
                tenant: "t".into(),
                deleted: true,
            },
            None,
            None,
        ),
        inv(
            Change::Custom {
                group: "g".into(),
                tenant: None,
                key: Some("a:b".into()),
            },
            None,
            None,
        ),
        inv(
            Change::Evict {
                group: Some(Group::FhirConnect),
                tenant: Some("t".into()),
                key: None,
            },
            None,
            None,
        ),
        inv(
            Change::Evict {
                group: None,
                tenant: None,
                key: None,
            },
            None,
            None,
        ),
        Message::Heartbeat(Heartbeat {
            origin: "n1".into(),
            seq: 7,
            at_unix_ms: 1_700_000_000_000,
            peers: vec![
                "10.0.0.2:7800".parse().unwrap(),
                "[fd00::3]:7800".parse().unwrap(),
                SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 7800, 0, 3)),
            ],
        }),
        Message::Heartbeat(Heartbeat {
            origin: "n1".into(),
            seq: 0,
            at_unix_ms: 0,
            peers: vec![],
        }),
        Message::Leave(Leave {
            origin: "n.1_x-y".into(),
        }),
    ]
}

#[test]
fn every_session_message_round_trips() {
    for m in samples() {
        let b = encode_body(&m).unwrap();
        assert_eq!(decode_body(&b).unwrap(), m, "{b:?}");
    }
}

#[test]
fn an_invalidation_is_a_few_dozen_bytes() {
    let m = &samples()[0];
    let b = encode_body(m).unwrap();
    assert_eq!(b.len(), 1 + 7 + 8 + 1 + 8 + 8 + 1 + 2 + 7 + 2 + 12);
    let json = crate::cluster::wire::Envelope::new("openfhir", m.clone())
        .encode()
        .unwrap();
    assert!(
        b.len() * 3 < json.len(),
        "{} against {}",
        b.len(),
        json.len()
    );
}

#[test]
fn every_prefix_and_every_extension_is_refused() {
    for m in samples() {
        let b = encode_body(&m).unwrap();
        for n in 0..b.len() {
            assert!(decode_body(&b[..n]).is_err(), "prefix {n} of {m:?}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(decode_body(&longer).is_err());
    }
}

#[test]
fn hostile_fields_are_refused() {
    let long_origin = {
        let mut b = vec![LEAVE, 65];
        b.extend_from_slice(&[b'a'; 65]);
        b
    };
    let many_peers = {
        let mut b = vec![HEARTBEAT, 1, b'a'];
        b.extend_from_slice(&[0; 16]);
        b.extend_from_slice(&((MAX_GOSSIP + 1) as u16).to_be_bytes());
        b
    };
    let bad_utf8 = vec![LEAVE, 1, 0xff];
    let bad_flag = {
        let mut b = encode_body(&samples()[3]).unwrap();
        *b.last_mut().unwrap() = 2;
        b
    };
    let bad_flags = {
        let mut b = encode_body(&samples()[3]).unwrap();
        b[1 + 7 + 8] = 0x80;
        b
    };
    for bad in [
        &[][..],
        &[0],
        &[9, 0],
        &long_origin,
        &many_peers,
        &bad_utf8,
        &bad_flag,
        &bad_flags,
    ] {
        assert!(
            matches!(
                decode_body(bad),
                Err(WireError::Malformed(_) | WireError::Empty)
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        decode_body(&vec![0; MAX_FRAME + 1]),
        Err(WireError::TooLarge { .. })
    ));
}

#[test]
fn only_session_messages_and_bounded_fields_encode() {
    let hello = Message::Confirm(crate::cluster::wire::Confirm {});
    assert!(matches!(encode_body(&hello), Err(WireError::Malformed(_))));
    let long = Message::Leave(Leave {
        origin: "a".repeat(NODE_ID_MAX + 1),
    });
    assert!(matches!(
        encode_body(&long),
        Err(WireError::TooLarge { .. })
    ));
    let huge = Message::Invalidate(Invalidate {
        origin: "a".into(),
        seq: 1,
        log_position: None,
        change: Change::Opt {
            tenant: "t".into(),
            template_id: "k".repeat(70_000),
        },
        at_unix_ms: None,
    });
    assert!(matches!(
        encode_body(&huge),
        Err(WireError::TooLarge { .. })
    ));
}
