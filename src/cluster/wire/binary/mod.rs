//! The compact binary form of the messages a joined peer sends (protocol 3): [`Invalidate`],
//! [`Heartbeat`] and [`Leave`]. The handshake stays JSON ([`super::Envelope`]).
//!
//! # Why a binary body, and why hand-written
//! An invalidation is sent to every peer after every write, and each receiver decodes it: the
//! JSON envelope cost 0.8 µs to build and 2.7 µs to parse (serde_json, with the magic number,
//! the protocol and the cluster name repeated in every frame although the handshake already
//! settled them). This form carries only the message, in a few dozen bytes, and decodes with
//! slices and bounds checks. A serde format crate (postcard, bincode) would need the
//! [`Change`] type's serde form to work without self-description, which its internally tagged
//! JSON form (`"kind": "opt"`) does not; the codec below is short, total and fuzzed.
//!
//! # Layout
//! Integers are big-endian. A string is a `u16` byte length and UTF-8 bytes; an optional value
//! is a byte 0 (absent) or 1 (present) and the value.
//!
//! ```text
//! Invalidate: 0x01 | origin: u8 length, bytes | seq: u64 | flags: u8 (1: log position, 2: time)
//!             | [log position: i64] | [at_unix_ms: u64] | change
//! Heartbeat:  0x02 | origin | seq: u64 | at_unix_ms: u64 | count: u16 | count × address
//! Leave:      0x03 | origin
//! change:     kind: u8 | fields
//!             0 opt, 1 context: tenant, template id;  2 model: tenant, name;
//!             3 tenant: tenant, deleted: u8 (0 or 1);
//!             4 custom: group, optional tenant, optional key;
//!             5 evict: optional group (u8: 0 opt, 1 fhir_connect, 2 tenant), optional tenant,
//!               optional key
//! address:    4 | IPv4 (4 bytes) | port: u16   or   6 | IPv6 (16 bytes) | port: u16 | scope: u32
//! ```
//!
//! # Guarantees
//! [`decode_body`] is total: any bytes give a [`Message`] or a [`WireError`], never a panic; it
//! allocates only for the strings it returns, each bounded by the input's length (at most
//! [`MAX_FRAME`]); the node id is at most [`NODE_ID_MAX`] bytes, a heartbeat lists at most
//! [`MAX_GOSSIP`] addresses, booleans are 0 or 1, and trailing bytes are refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use super::frame::check_len;
use super::{Heartbeat, Invalidate, Leave, Message, WireError, MAX_FRAME, MAX_GOSSIP};
use crate::cache::{Change, Group};
use crate::cluster::session::NODE_ID_MAX;

const INVALIDATE: u8 = 1;
const HEARTBEAT: u8 = 2;
const LEAVE: u8 = 3;

const HAS_LOG_POSITION: u8 = 1;
const HAS_TIME: u8 = 2;

/// Encodes `msg` (an [`Invalidate`], [`Heartbeat`] or [`Leave`]) as a session frame body.
///
/// Fails with [`WireError::Malformed`] for a handshake message (those travel as JSON), and with
/// [`WireError::TooLarge`] when a string is longer than its length field or the body longer than
/// [`MAX_FRAME`].
pub fn encode_body(msg: &Message) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(64);
    match msg {
        Message::Invalidate(i) => encode_invalidate(
            &mut out,
            &i.origin,
            i.seq,
            i.log_position,
            &i.change,
            i.at_unix_ms,
        )?,
        Message::Heartbeat(h) => {
            out.push(HEARTBEAT);
            put_origin(&mut out, &h.origin)?;
            out.extend_from_slice(&h.seq.to_be_bytes());
            out.extend_from_slice(&h.at_unix_ms.to_be_bytes());
            let n = h.peers.len().min(MAX_GOSSIP);
            out.extend_from_slice(&(n as u16).to_be_bytes());
            for a in &h.peers[..n] {
                put_addr(&mut out, a);
            }
        }
        Message::Leave(l) => {
            out.push(LEAVE);
            put_origin(&mut out, &l.origin)?;
        }
        other => {
            return Err(WireError::Malformed(format!(
                "a {} message is not sent after the handshake",
                other.kind()
            )))
        }
    }
    check_len(out.len(), MAX_FRAME)?;
    Ok(out)
}

/// Appends an [`Invalidate`] body to `out`, from borrowed parts (the broadcaster encodes each
/// change once, for every peer, without building the message). On error `out` may hold part of
/// the body: discard it.
pub fn encode_invalidate(
    out: &mut Vec<u8>,
    origin: &str,
    seq: u64,
    log_position: Option<i64>,
    change: &Change,
    at_unix_ms: Option<u64>,
) -> Result<(), WireError> {
    let start = out.len();
    out.push(INVALIDATE);
    put_origin(out, origin)?;
    out.extend_from_slice(&seq.to_be_bytes());
    let flags = if log_position.is_some() {
        HAS_LOG_POSITION
    } else {
        0
    } | if at_unix_ms.is_some() { HAS_TIME } else { 0 };
    out.push(flags);
    if let Some(p) = log_position {
        out.extend_from_slice(&p.to_be_bytes());
    }
    if let Some(t) = at_unix_ms {
        out.extend_from_slice(&t.to_be_bytes());
    }
    put_change(out, change)?;
    check_len(out.len() - start, MAX_FRAME)?;
    Ok(())
}

fn put_origin(out: &mut Vec<u8>, origin: &str) -> Result<(), WireError> {
    let n = u8::try_from(origin.len())
        .ok()
        .filter(|&n| usize::from(n) <= NODE_ID_MAX)
        .ok_or(WireError::TooLarge {
            len: origin.len(),
            max: NODE_ID_MAX,
        })?;
    out.push(n);
    out.extend_from_slice(origin.as_bytes());
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<(), WireError> {
    let n = u16::try_from(s.len()).map_err(|_| WireError::TooLarge {
        len: s.len(),
        max: u16::MAX as usize,
    })?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) -> Result<(), WireError> {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s)?;
        }
    }
    Ok(())
}

fn group_code(g: Group) -> u8 {
    match g {
        Group::Opt => 0,
        Group::FhirConnect => 1,
        Group::Tenant => 2,
    }
}

fn put_change(out: &mut Vec<u8>, c: &Change) -> Result<(), WireError> {
    match c {
        Change::Opt {
            tenant,
            template_id,
        } => {
            out.push(0);
            put_str(out, tenant)?;
            put_str(out, template_id)
        }
        Change::Context {
            tenant,
            template_id,
        } => {
            out.push(1);
            put_str(out, tenant)?;
            put_str(out, template_id)
        }
        Change::Model { tenant, name } => {
            out.push(2);
            put_str(out, tenant)?;
            put_str(out, name)
        }
        Change::Tenant { tenant, deleted } => {
            out.push(3);
            put_str(out, tenant)?;
            out.push(u8::from(*deleted));
            Ok(())
        }
        Change::Custom { group, tenant, key } => {
            out.push(4);
            put_str(out, group)?;
            put_opt_str(out, tenant.as_deref())?;
            put_opt_str(out, key.as_deref())
        }
        Change::Evict { group, tenant, key } => {
            out.push(5);
            match group {
                None => out.push(0),
                Some(g) => {
                    out.push(1);
                    out.push(group_code(*g));
                }
            }
            put_opt_str(out, tenant.as_deref())?;
            put_opt_str(out, key.as_deref())
        }
    }
}

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    match a {
        SocketAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.ip().octets());
            out.extend_from_slice(&v4.port().to_be_bytes());
        }
        SocketAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.ip().octets());
            out.extend_from_slice(&v6.port().to_be_bytes());
            out.extend_from_slice(&v6.scope_id().to_be_bytes());
        }
    }
}

/// A cursor over a body; every read is bounds-checked and fails with a [`WireError::Malformed`]
/// naming what was cut short.
struct Reader<'a> {
    rest: &'a [u8],
}

fn malformed(what: &str) -> WireError {
    WireError::Malformed(format!("binary message: {what}"))
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(malformed(&format!("{what} cut short")));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], WireError> {
        let b = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn flag(&mut self, what: &str) -> Result<bool, WireError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(malformed(&format!("{what} is {b}, not 0 or 1"))),
        }
    }

    fn utf8(bytes: &[u8], what: &str) -> Result<String, WireError> {
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|_| malformed(&format!("{what} is not UTF-8")))
    }

    fn origin(&mut self) -> Result<String, WireError> {
        let n = usize::from(self.u8("origin length")?);
        if n > NODE_ID_MAX {
            return Err(malformed(&format!(
                "origin of {n} bytes (at most {NODE_ID_MAX})"
            )));
        }
        let b = self.take(n, "origin")?;
        Self::utf8(b, "origin")
    }

    fn str(&mut self, what: &str) -> Result<String, WireError> {
        let n = usize::from(self.u16(what)?);
        let b = self.take(n, what)?;
        Self::utf8(b, what)
    }

    fn opt_str(&mut self, what: &str) -> Result<Option<String>, WireError> {
        if self.flag(what)? {
            self.str(what).map(Some)
        } else {
            Ok(None)
        }
    }

    fn change(&mut self) -> Result<Change, WireError> {
        Ok(match self.u8("change kind")? {
            0 => Change::Opt {
                tenant: self.str("tenant")?,
                template_id: self.str("template id")?,
            },
            1 => Change::Context {
                tenant: self.str("tenant")?,
                template_id: self.str("template id")?,
            },
            2 => Change::Model {
                tenant: self.str("tenant")?,
                name: self.str("model name")?,
            },
            3 => Change::Tenant {
                tenant: self.str("tenant")?,
                deleted: self.flag("deleted")?,
            },
            4 => Change::Custom {
                group: self.str("group")?,
                tenant: self.opt_str("tenant")?,
                key: self.opt_str("key")?,
            },
            5 => {
                let group = if self.flag("group")? {
                    Some(match self.u8("group")? {
                        0 => Group::Opt,
                        1 => Group::FhirConnect,
                        2 => Group::Tenant,
                        g => return Err(malformed(&format!("unknown group {g}"))),
                    })
                } else {
                    None
                };
                Change::Evict {
                    group,
                    tenant: self.opt_str("tenant")?,
                    key: self.opt_str("key")?,
                }
            }
            k => return Err(malformed(&format!("unknown change kind {k}"))),
        })
    }

    fn addr(&mut self) -> Result<SocketAddr, WireError> {
        match self.u8("address family")? {
            4 => {
                let ip = Ipv4Addr::from(self.array::<4>("IPv4 address")?);
                let port = self.u16("port")?;
                Ok(SocketAddr::new(IpAddr::V4(ip), port))
            }
            6 => {
                let ip = Ipv6Addr::from(self.array::<16>("IPv6 address")?);
                let port = self.u16("port")?;
                let scope = u32::from_be_bytes(self.array("scope id")?);
                Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope)))
            }
            f => Err(malformed(&format!("unknown address family {f}"))),
        }
    }
}

/// Decodes a session frame body (see the module documentation for the checks).
pub fn decode_body(bytes: &[u8]) -> Result<Message, WireError> {
    check_len(bytes.len(), MAX_FRAME)?;
    let mut r = Reader { rest: bytes };
    let msg = match r.u8("message type")? {
        INVALIDATE => {
            let origin = r.origin()?;
            let seq = r.u64("sequence number")?;
            let flags = r.u8("flags")?;
            if flags & !(HAS_LOG_POSITION | HAS_TIME) != 0 {
                return Err(malformed(&format!("unknown flags {flags:#04x}")));
            }
            let log_position = if flags & HAS_LOG_POSITION != 0 {
                Some(i64::from_be_bytes(r.array("log position")?))
            } else {
                None
            };
            let at_unix_ms = if flags & HAS_TIME != 0 {
                Some(r.u64("time")?)
            } else {
                None
            };
            Message::Invalidate(Invalidate {
                origin,
                seq,
                log_position,
                change: r.change()?,
                at_unix_ms,
            })
        }
        HEARTBEAT => {
            let origin = r.origin()?;
            let seq = r.u64("sequence number")?;
            let at_unix_ms = r.u64("time")?;
            let n = usize::from(r.u16("address count")?);
            if n > MAX_GOSSIP {
                return Err(malformed(&format!("{n} addresses (at most {MAX_GOSSIP})")));
            }
            let mut peers = Vec::with_capacity(n.min(r.rest.len() / 7));
            for _ in 0..n {
                peers.push(r.addr()?);
            }
            Message::Heartbeat(Heartbeat {
                origin,
                seq,
                at_unix_ms,
                peers,
            })
        }
        LEAVE => Message::Leave(Leave {
            origin: r.origin()?,
        }),
        t => return Err(malformed(&format!("unknown message type {t}"))),
    };
    if !r.rest.is_empty() {
        return Err(malformed(&format!(
            "{} bytes after the message",
            r.rest.len()
        )));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests;
