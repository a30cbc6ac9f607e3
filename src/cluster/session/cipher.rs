//! Session frames after the handshake: [`Sealer`] for what this node sends, [`Opener`] for what
//! the peer sends.
//!
//! With a cluster secret every frame payload is one Noise transport message (ChaCha20-Poly1305
//! under the keys of the handshake, see [`super`]): the plaintext message and a 16-byte tag. The
//! AEAD nonce is the frame's position in its direction (0, 1, 2, ...), never sent: a frame that is
//! forged, altered, replayed, reordered, dropped before another, reflected back to its sender or
//! taken from another session fails the one tag check ([`WireError::BadMac`]). The two directions
//! have their own keys, so the sealer (writer task) and the opener (reader task) share only the
//! immutable key schedule.
//!
//! Without a secret, frames are the plain message bytes; the API is the same, so callers do not
//! branch. (The payload is JSON during the handshake and the binary form of
//! [`encode_body`] after it.)

use std::fmt;
use std::sync::Arc;

use snow::StatelessTransportState;
use tokio::io::{AsyncRead, AsyncWrite};

use super::super::wire::{
    decode_body, encode_body, read_frame, write_frame, Envelope, WireError, FRAME_HEADER_LEN,
    MAX_FRAME,
};

/// Bytes a sealed frame adds to the envelope: the ChaCha20-Poly1305 tag.
pub const SEAL_OVERHEAD: usize = 16;

/// The longest Noise message (the protocol's limit); a sealed frame is one.
const NOISE_MAX: usize = 65_535;

/// The longest sealed frame payload: the smaller of the frame limit and Noise's.
const SEALED_FRAME_MAX: usize = if MAX_FRAME < NOISE_MAX {
    MAX_FRAME
} else {
    NOISE_MAX
};

/// The key schedule of an established session, shared by its two halves.
pub(super) type Keys = Arc<StatelessTransportState>;

/// Seals outgoing session frames: one per connection.
pub struct Sealer {
    keys: Option<Keys>,
    next: u64,
}

/// Opens incoming session frames: one per connection.
pub struct Opener {
    keys: Option<Keys>,
    next: u64,
    plain: Vec<u8>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("encrypted", &self.keys.is_some())
            .field("sealed", &self.next)
            .finish()
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("encrypted", &self.keys.is_some())
            .field("opened", &self.next)
            .finish()
    }
}

impl Sealer {
    /// A sealer without keys: frames go out as plain JSON.
    pub fn plain() -> Sealer {
        Sealer {
            keys: None,
            next: 0,
        }
    }

    pub(super) fn keyed(keys: Keys) -> Sealer {
        Sealer {
            keys: Some(keys),
            next: 0,
        }
    }

    /// True when frames are encrypted and authenticated.
    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// How many frames this sealer has sealed (always 0 without keys).
    pub fn sealed(&self) -> u64 {
        self.next
    }

    /// The frame payload for `json`: the Noise message with keys, `json` without.
    ///
    /// Fails, without using a nonce, when `json` is empty or the result would exceed
    /// [`MAX_FRAME`] (or Noise's 65,535 bytes).
    pub fn seal(&mut self, json: &[u8]) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.seal_into(json, &mut out)?;
        Ok(out)
    }

    /// The whole frame for `json`: the frame header ([`FRAME_HEADER_LEN`] bytes) and the payload
    /// [`Sealer::seal`] makes, in one buffer, ready to write. Fails like [`Sealer::seal`].
    pub fn seal_frame(&mut self, json: &[u8]) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN + SEAL_OVERHEAD + json.len());
        self.seal_frame_into(json, &mut out)?;
        Ok(out)
    }

    /// Appends the whole frame [`Sealer::seal_frame`] makes to `out`, so that one buffer can
    /// carry several frames (one write for a batch) and be reused (no allocation per frame). On
    /// failure `out` is as it was and no nonce is used.
    pub fn seal_frame_into(&mut self, body: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
        if let Err(e) = self.seal_into(body, out) {
            out.truncate(start);
            return Err(e);
        }
        let n = out.len() - start - FRAME_HEADER_LEN;
        // `seal_into` refused anything over MAX_FRAME, so the length fits a u32.
        let len = u32::try_from(n).map_err(|_| WireError::TooLarge {
            len: n,
            max: MAX_FRAME,
        })?;
        out[start..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    /// Appends the payload [`Sealer::seal`] makes to `out`; on failure `out` is as it was and no
    /// nonce is used.
    fn seal_into(&mut self, json: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
        if json.is_empty() {
            return Err(WireError::Empty);
        }
        let Some(keys) = &self.keys else {
            if json.len() > MAX_FRAME {
                return Err(WireError::TooLarge {
                    len: json.len(),
                    max: MAX_FRAME,
                });
            }
            out.extend_from_slice(json);
            return Ok(());
        };
        let len = json.len().saturating_add(SEAL_OVERHEAD);
        if len > SEALED_FRAME_MAX {
            return Err(WireError::TooLarge {
                len,
                max: SEALED_FRAME_MAX,
            });
        }
        // u64::MAX is Noise's reserved nonce; a session never gets near it, but stop cleanly.
        if self.next == u64::MAX {
            return Err(WireError::SeqExhausted);
        }
        let start = out.len();
        out.resize(start + len, 0);
        match keys.write_message(self.next, json, &mut out[start..]) {
            Ok(n) if n == len => {
                self.next += 1;
                Ok(())
            }
            // The length was checked above; any other outcome leaves `out` untouched.
            _ => {
                out.truncate(start);
                Err(WireError::Malformed("the frame could not be sealed".into()))
            }
        }
    }

    /// Encodes (in the binary form of the session, [`encode_body`]: the envelope's cluster name
    /// was settled by the handshake and is not sent), seals and writes `envelope`'s message as one
    /// frame.
    pub async fn send<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        envelope: &Envelope,
    ) -> Result<(), WireError> {
        let frame = self.seal(&encode_body(&envelope.body)?)?;
        write_frame(w, &frame).await
    }
}

impl Opener {
    /// An opener without keys: frames are taken as plain JSON.
    pub fn plain() -> Opener {
        Opener {
            keys: None,
            next: 0,
            plain: Vec::new(),
        }
    }

    pub(super) fn keyed(keys: Keys) -> Opener {
        Opener {
            keys: Some(keys),
            next: 0,
            plain: Vec::new(),
        }
    }

    /// True when frames must be encrypted under the session's keys.
    pub fn is_encrypted(&self) -> bool {
        self.keys.is_some()
    }

    /// How many frames this opener has accepted (always 0 without keys).
    pub fn opened(&self) -> u64 {
        self.next
    }

    /// The JSON inside a frame payload.
    ///
    /// With keys: [`WireError::TooLarge`] over the limit, [`WireError::Truncated`] shorter than a
    /// tag, [`WireError::BadMac`] for anything that does not open at this position. A refused
    /// frame leaves the position unchanged (the caller drops the connection anyway).
    pub fn open<'a>(&'a mut self, frame: &'a [u8]) -> Result<&'a [u8], WireError> {
        if frame.len() > MAX_FRAME {
            return Err(WireError::TooLarge {
                len: frame.len(),
                max: MAX_FRAME,
            });
        }
        let Some(keys) = &self.keys else {
            if frame.is_empty() {
                return Err(WireError::Empty);
            }
            return Ok(frame);
        };
        if frame.len() > SEALED_FRAME_MAX {
            return Err(WireError::TooLarge {
                len: frame.len(),
                max: SEALED_FRAME_MAX,
            });
        }
        if frame.len() < SEAL_OVERHEAD {
            return Err(WireError::Truncated);
        }
        self.plain.resize(frame.len() - SEAL_OVERHEAD, 0);
        let n = keys
            .read_message(self.next, frame, &mut self.plain)
            .map_err(|_| WireError::BadMac)?;
        if n == 0 {
            return Err(WireError::Empty);
        }
        self.next += 1;
        Ok(&self.plain[..n])
    }

    /// Reads one frame, opens it and decodes the session message ([`decode_body`]), returned in
    /// an envelope of cluster `cluster` (the session's, settled by the handshake).
    pub async fn recv<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        cluster: &str,
    ) -> Result<Envelope, WireError> {
        let frame = read_frame(r, MAX_FRAME).await?;
        Ok(Envelope::new(cluster, decode_body(self.open(&frame)?)?))
    }
}
