//! The shared `CLUSTER_SECRET` and the keys derived from it.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::wire::TAG_LEN;

type HmacSha256 = Hmac<Sha256>;

/// Length of the Noise pre-shared key.
pub const PSK_LEN: usize = 32;

/// The shared `CLUSTER_SECRET`. Its `Debug` output is `ClusterSecret(***)`.
///
/// Two keys come from it: the Noise pre-shared key of the peer channel
/// ([`ClusterSecret::noise_psk`]) and the MAC key of multicast announcements
/// ([`ClusterSecret::mac`]), each under its own label, so neither can stand in for the other.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret {
    secret: Vec<u8>,
    psk: [u8; PSK_LEN],
}

impl ClusterSecret {
    /// The secret, or `None` for an empty value (an empty `CLUSTER_SECRET` means "no secret").
    pub fn new(secret: impl AsRef<[u8]>) -> Option<ClusterSecret> {
        let s = secret.as_ref();
        if s.is_empty() {
            return None;
        }
        // The secret may be any length and entropy; Noise wants exactly 32 uniform bytes.
        let psk = tag(s, &[b"openfhir-cache noise psk v1"]);
        Some(ClusterSecret {
            secret: s.to_vec(),
            psk,
        })
    }

    /// The Noise pre-shared key (`psk0` of the peer channel's handshake).
    pub fn noise_psk(&self) -> &[u8; PSK_LEN] {
        &self.psk
    }

    /// HMAC-SHA256 under the secret of the concatenated `parts` (for messages outside a session,
    /// such as multicast announcements). Put a distinct label first so tags of one message
    /// kind can never be replayed as another.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        tag(&self.secret, parts)
    }

    /// Checks a [`ClusterSecret::mac`] tag in constant time.
    pub fn verify(&self, parts: &[&[u8]], expected: &[u8]) -> bool {
        hmac(&self.secret, parts).verify_slice(expected).is_ok()
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(***)")
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac =
        <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        mac.update(p);
    }
    mac
}

fn tag(key: &[u8], parts: &[&[u8]]) -> [u8; TAG_LEN] {
    hmac(key, parts).finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_masked_and_empty_means_none() {
        assert_eq!(
            format!("{:?}", ClusterSecret::new("hunter2")),
            "Some(ClusterSecret(***))"
        );
        assert!(ClusterSecret::new("").is_none());
    }

    #[test]
    fn keys_differ_by_secret_and_by_use() {
        let a = ClusterSecret::new("a").unwrap();
        let b = ClusterSecret::new("b").unwrap();
        assert_ne!(a.noise_psk(), b.noise_psk());
        let t = a.mac(&[b"announce", b"x"]);
        assert!(a.verify(&[b"announce", b"x"], &t));
        assert!(!b.verify(&[b"announce", b"x"], &t));
    }
}
