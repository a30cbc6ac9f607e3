//! Frames: a `u32` big-endian length, then the payload; the length checked against the limit
//! before anything is allocated.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{WireError, FRAME_HEADER_LEN, MAX_FRAME};

/// Frames `payload`: its `u32` big-endian length, then the bytes.
///
/// Fails with [`WireError::Empty`] or [`WireError::TooLarge`] (over [`MAX_FRAME`]) rather than
/// produce a frame every peer would refuse.
pub fn encode_frame(payload: &[u8]) -> Result<Vec<u8>, WireError> {
    let len = check_len(payload.len(), MAX_FRAME)?;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Reads a frame header from the first [`FRAME_HEADER_LEN`] bytes of `header` and returns the
/// payload length, refused if 0 ([`WireError::Empty`]) or above `max` ([`WireError::TooLarge`]).
pub fn decode_frame_header(header: &[u8], max: usize) -> Result<usize, WireError> {
    let Some(bytes) = header.first_chunk::<FRAME_HEADER_LEN>() else {
        return Err(WireError::Truncated);
    };
    let len = u32::from_be_bytes(*bytes) as usize;
    check_len(len, max)?;
    Ok(len)
}

/// Splits one complete frame off the front of `buf`: `(payload, rest)`.
///
/// [`WireError::Truncated`] when `buf` holds less than a whole frame.
pub fn decode_frame(buf: &[u8], max: usize) -> Result<(&[u8], &[u8]), WireError> {
    let len = decode_frame_header(buf, max)?;
    let body = &buf[FRAME_HEADER_LEN..];
    if body.len() < len {
        return Err(WireError::Truncated);
    }
    Ok(body.split_at(len))
}

/// Reads one frame and returns its payload.
///
/// The length is checked against `max` before the payload buffer is allocated. A stream that ends
/// exactly between two frames gives [`WireError::Closed`]; one that ends inside a frame gives
/// [`WireError::Truncated`].
///
/// # Cancel safety
/// Not cancel safe: a cancelled read may leave the stream in the middle of a frame. Wrap the whole
/// connection, not a single read, in a timeout.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Vec<u8>, WireError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut filled = 0;
    while filled < FRAME_HEADER_LEN {
        let n = r.read(&mut header[filled..]).await?;
        if n == 0 {
            return Err(if filled == 0 {
                WireError::Closed
            } else {
                WireError::Truncated
            });
        }
        filled += n;
    }
    let len = decode_frame_header(&header, max)?;
    let mut payload = vec![0u8; len];
    match r.read_exact(&mut payload).await {
        Ok(_) => Ok(payload),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Reads frames through a buffer: one read usually brings a whole frame (header and payload, or
/// several frames), where [`read_frame`] needs at least two.
///
/// The length is checked against the limit before room for the payload is reserved, as in
/// [`read_frame`], so a header claiming 4 GiB costs four bytes.
///
/// # Cancel safety
/// [`FrameReader::next`] is cancel safe: bytes read before a cancellation stay in the buffer and
/// the next call continues with them. Race it against a timer freely.
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    max: usize,
}

/// Room reserved for each read: several small frames, in one system call.
const READ_CHUNK: usize = 8 * 1024;

impl FrameReader {
    /// A reader of frames of at most `max` payload bytes.
    pub fn new(max: usize) -> FrameReader {
        FrameReader {
            buf: BytesMut::new(),
            max,
        }
    }

    /// The next frame's payload. A stream that ends exactly between two frames gives
    /// [`WireError::Closed`]; one that ends inside a frame gives [`WireError::Truncated`].
    pub async fn next<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Bytes, WireError> {
        loop {
            let mut want = READ_CHUNK;
            if self.buf.len() >= FRAME_HEADER_LEN {
                let len = decode_frame_header(&self.buf, self.max)?;
                let total = FRAME_HEADER_LEN + len;
                if self.buf.len() >= total {
                    let mut frame = self.buf.split_to(total);
                    frame.advance(FRAME_HEADER_LEN);
                    return Ok(frame.freeze());
                }
                want = want.max(total - self.buf.len());
            }
            self.buf.reserve(want);
            if r.read_buf(&mut self.buf).await? == 0 {
                return Err(if self.buf.is_empty() {
                    WireError::Closed
                } else {
                    WireError::Truncated
                });
            }
        }
    }
}

/// Writes `payload` as one frame and flushes.
///
/// Refuses (without writing anything) an empty payload or one over [`MAX_FRAME`].
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
) -> Result<(), WireError> {
    let len = check_len(payload.len(), MAX_FRAME)?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(payload).await?;
    w.flush().await?;
    Ok(())
}

pub(super) fn check_len(len: usize, max: usize) -> Result<u32, WireError> {
    if len == 0 {
        return Err(WireError::Empty);
    }
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    u32::try_from(len).map_err(|_| WireError::TooLarge {
        len,
        max: u32::MAX as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_helpers() {
        let f = encode_frame(b"abc").unwrap();
        assert_eq!(f, [0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(decode_frame_header(&f, MAX_FRAME).unwrap(), 3);
        let mut two = f.clone();
        two.extend_from_slice(&f);
        let (p, rest) = decode_frame(&two, MAX_FRAME).unwrap();
        assert_eq!((p, rest), (&b"abc"[..], &f[..]));
        assert!(matches!(
            decode_frame(&f[..5], MAX_FRAME),
            Err(WireError::Truncated)
        ));
        assert!(matches!(
            decode_frame_header(&f[..3], MAX_FRAME),
            Err(WireError::Truncated)
        ));
        assert!(matches!(
            decode_frame_header(&[0; 4], MAX_FRAME),
            Err(WireError::Empty)
        ));
        assert!(matches!(
            decode_frame_header(&[0xff; 4], MAX_FRAME),
            Err(WireError::TooLarge {
                len: 0xffff_ffff,
                max: MAX_FRAME
            })
        ));
        assert!(matches!(encode_frame(b""), Err(WireError::Empty)));
        assert!(matches!(
            encode_frame(&vec![0; MAX_FRAME + 1]),
            Err(WireError::TooLarge { .. })
        ));
        assert!(encode_frame(&vec![0; MAX_FRAME]).is_ok());
    }

    #[tokio::test]
    async fn read_and_write_frames() {
        // A 1 KiB pipe: the 5000-byte frame arrives in pieces while the writer is still writing.
        let (mut a, mut b) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            write_frame(&mut a, b"one").await.unwrap();
            write_frame(&mut a, &vec![9; 5000]).await.unwrap();
            assert!(matches!(
                write_frame(&mut a, b"").await,
                Err(WireError::Empty)
            ));
        });
        assert_eq!(read_frame(&mut b, MAX_FRAME).await.unwrap(), b"one");
        assert_eq!(read_frame(&mut b, MAX_FRAME).await.unwrap(), vec![9; 5000]);
        writer.await.unwrap();
        assert!(matches!(
            read_frame(&mut b, MAX_FRAME).await,
            Err(WireError::Closed)
        ));
    }

    #[tokio::test]
    async fn read_frame_reports_truncation_and_limits() {
        let mut r: &[u8] = &[0, 0];
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME).await,
            Err(WireError::Truncated)
        ));
        let mut r: &[u8] = &[0, 0, 0, 5, 1, 2];
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME).await,
            Err(WireError::Truncated)
        ));
        let mut r: &[u8] = &[0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME).await,
            Err(WireError::Empty)
        ));
        let mut r: &[u8] = &[0, 0, 0, 11, 0];
        assert!(matches!(
            read_frame(&mut r, 10).await,
            Err(WireError::TooLarge { len: 11, max: 10 })
        ));
    }

    #[tokio::test]
    async fn the_frame_reader_reads_several_frames_and_pieces_alike() {
        // Two frames in one write, then one split across writes.
        let (mut a, mut b) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            let mut both = encode_frame(b"one").unwrap();
            both.extend(encode_frame(b"two").unwrap());
            a.write_all(&both).await.unwrap();
            write_frame(&mut a, &vec![9; 5000]).await.unwrap();
        });
        let mut frames = FrameReader::new(MAX_FRAME);
        assert_eq!(&frames.next(&mut b).await.unwrap()[..], b"one");
        assert_eq!(&frames.next(&mut b).await.unwrap()[..], b"two");
        assert_eq!(&frames.next(&mut b).await.unwrap()[..], &[9; 5000][..]);
        writer.await.unwrap();
        assert!(matches!(frames.next(&mut b).await, Err(WireError::Closed)));
    }

    #[tokio::test]
    async fn the_frame_reader_is_cancel_safe() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let mut frames = FrameReader::new(MAX_FRAME);
        // Half a frame, then the read is abandoned (as when the idle timer wins the race).
        let frame = encode_frame(b"whole").unwrap();
        a.write_all(&frame[..6]).await.unwrap();
        let abandoned =
            tokio::time::timeout(std::time::Duration::from_millis(20), frames.next(&mut b)).await;
        assert!(abandoned.is_err());
        a.write_all(&frame[6..]).await.unwrap();
        assert_eq!(&frames.next(&mut b).await.unwrap()[..], b"whole");
    }

    #[tokio::test]
    async fn the_frame_reader_reports_truncation_and_limits_like_read_frame() {
        let reader = || FrameReader::new(MAX_FRAME);
        let mut r: &[u8] = &[0, 0];
        assert!(matches!(
            reader().next(&mut r).await,
            Err(WireError::Truncated)
        ));
        let mut r: &[u8] = &[0, 0, 0, 5, 1, 2];
        assert!(matches!(
            reader().next(&mut r).await,
            Err(WireError::Truncated)
        ));
        let mut r: &[u8] = &[0, 0, 0, 0];
        assert!(matches!(reader().next(&mut r).await, Err(WireError::Empty)));
        // Refused from the header alone: nothing reserved for the claimed 4 GiB.
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0];
        assert!(matches!(
            reader().next(&mut r).await,
            Err(WireError::TooLarge { .. })
        ));
        let mut r: &[u8] = &[0, 0, 0, 11, 0];
        assert!(matches!(
            FrameReader::new(10).next(&mut r).await,
            Err(WireError::TooLarge { len: 11, max: 10 })
        ));
    }
}
