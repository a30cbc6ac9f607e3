//! The byte strings of the handshake and the announcements, [`Tag`] and [`Sealed`], written as
//! hex.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{WireError, SEALED_MAX, TAG_LEN};

/// An HMAC-SHA256 tag (a multicast announcement's MAC), written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(pub [u8; TAG_LEN]);

macro_rules! hex_newtype {
    ($t:ident, $n:expr, $what:literal) => {
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({})"), to_hex(&self.0))
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&to_hex(&self.0))
            }
        }
        impl std::str::FromStr for $t {
            type Err = WireError;
            fn from_str(s: &str) -> Result<Self, WireError> {
                from_hex::<$n>(s).map($t).ok_or_else(|| {
                    WireError::Malformed(format!(
                        concat!($what, " must be {} hex digits, got {:?}"),
                        2 * $n,
                        truncate(s, 80)
                    ))
                })
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&to_hex(&self.0))
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
hex_newtype!(Tag, TAG_LEN, "a MAC");

/// A Noise handshake message, written as lowercase hex; at most [`SEALED_MAX`] bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Sealed(pub Vec<u8>);

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealed({} bytes)", self.0.len())
    }
}

impl std::str::FromStr for Sealed {
    type Err = WireError;
    fn from_str(s: &str) -> Result<Self, WireError> {
        if s.len() > 2 * SEALED_MAX {
            return Err(WireError::TooLarge {
                len: s.len() / 2,
                max: SEALED_MAX,
            });
        }
        if !s.len().is_multiple_of(2) {
            return Err(WireError::Malformed(
                "a Noise message must be an even number of hex digits".into(),
            ));
        }
        s.as_bytes()
            .chunks_exact(2)
            .map(|pair| Some((digit(pair[0])? << 4) | digit(pair[1])?))
            .collect::<Option<Vec<u8>>>()
            .map(Sealed)
            .ok_or_else(|| {
                WireError::Malformed(format!(
                    "a Noise message must be hex digits, got {:?}",
                    truncate(s, 80)
                ))
            })
    }
}

impl Serialize for Sealed {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for Sealed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

fn digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_accepts_either_case_and_rejects_the_rest() {
        assert_eq!("AB".repeat(32).parse::<Tag>().unwrap(), Tag([0xab; 32]));
        assert_eq!("00fF".parse::<Sealed>().unwrap(), Sealed(vec![0, 0xff]));
        for bad in ["0", "zz", "é"] {
            assert!(bad.parse::<Sealed>().is_err(), "{bad}");
        }
        let long = "00".repeat(SEALED_MAX + 1);
        assert!(matches!(
            long.parse::<Sealed>(),
            Err(WireError::TooLarge { .. })
        ));
        for bad in ["", "zz", &"a".repeat(63), &"a".repeat(66), &"é".repeat(32)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad}");
        }
        assert_eq!(Tag([0x0f; 32]).to_string(), "0f".repeat(32));
    }
}
