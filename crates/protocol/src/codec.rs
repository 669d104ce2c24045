//! Length-prefixed framing, independent of any async runtime.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::MAX_FRAME_BYTES;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed frame")]
    Malformed(#[source] postcard::Error),
    #[error("could not encode message")]
    Encode(#[source] postcard::Error),
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    // Encoded after room for the prefix, so the payload is not copied again.
    let mut out = postcard::to_extend(msg, vec![0u8; 4]).map_err(ProtocolError::Encode)?;
    let len = out.len() - 4;
    let too_large = ProtocolError::FrameTooLarge { len, max: MAX_FRAME_BYTES };
    if len > MAX_FRAME_BYTES {
        return Err(too_large);
    }
    let prefix = u32::try_from(len).map_err(|_| too_large)?;
    out[..4].copy_from_slice(&prefix.to_le_bytes());
    Ok(out)
}

/// The start of the frame [`encode_frame`] gives for `GuestMessage::UpperChunk { data }` with
/// `data_len` bytes of data: written, then followed by the data itself, it is that frame, so
/// a bulk sender never copies its data into a message (each copy costs under emulation).
pub fn upper_chunk_header(data_len: usize) -> Result<Vec<u8>, ProtocolError> {
    // The variant's tag as postcard writes it, then the byte string's varint length; postcard
    // writes a usize as the same varint.
    let empty =
        postcard::to_allocvec(&crate::GuestMessage::UpperChunk { data: Vec::new() }).map_err(ProtocolError::Encode)?;
    let tag = &empty[..empty.len() - 1];
    let len = postcard::to_allocvec(&data_len).map_err(ProtocolError::Encode)?;
    let payload = tag.len() + len.len() + data_len;
    let too_large = ProtocolError::FrameTooLarge { len: payload, max: MAX_FRAME_BYTES };
    if payload > MAX_FRAME_BYTES {
        return Err(too_large);
    }
    let prefix = u32::try_from(payload).map_err(|_| too_large)?;
    let mut out = Vec::with_capacity(4 + tag.len() + len.len());
    out.extend_from_slice(&prefix.to_le_bytes());
    out.extend_from_slice(tag);
    out.extend_from_slice(&len);
    Ok(out)
}

/// Accumulates bytes read from the channel and yields whole messages.
///
/// A length prefix above the decoder's limit is refused as soon as its four bytes arrive,
/// before anything is allocated for the body, so a hostile peer cannot make the reader buffer
/// more than one limit's worth of bytes.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder accepting payloads up to [`MAX_FRAME_BYTES`].
    pub fn new() -> Self {
        Self::with_limit(MAX_FRAME_BYTES)
    }

    /// A decoder accepting payloads up to `max` bytes (at most [`MAX_FRAME_BYTES`]).
    pub fn with_limit(max: usize) -> Self {
        Self { buf: Vec::new(), start: 0, max: max.min(MAX_FRAME_BYTES) }
    }

    /// Largest payload this decoder accepts.
    pub fn limit(&self) -> usize {
        self.max
    }

    /// Appends bytes as they arrive from the channel.
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Returns the next complete message, `Ok(None)` when more bytes are needed.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ProtocolError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            self.compact();
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > self.max {
            return Err(ProtocolError::FrameTooLarge { len, max: self.max });
        }
        if avail.len() < 4 + len {
            self.compact();
            return Ok(None);
        }
        let msg = postcard::from_bytes(&avail[4..4 + len]).map_err(ProtocolError::Malformed)?;
        self.start += 4 + len;
        Ok(Some(msg))
    }

    /// Bytes received but not yet consumed as messages.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestMessage, HostMessage, OutputStream};

    #[test]
    fn round_trips_across_arbitrary_chunking() {
        let msgs = vec![
            GuestMessage::Output { id: 1, stream: OutputStream::Stdout, data: b"hello\n".to_vec() },
            GuestMessage::Spawned { id: 1, pid: 42 },
            GuestMessage::Output { id: 2, stream: OutputStream::Stderr, data: vec![0u8; 70_000] },
        ];
        let bytes: Vec<u8> = msgs.iter().flat_map(|m| encode_frame(m).unwrap()).collect();
        for chunk in [1usize, 3, 7, 4096, bytes.len()] {
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            for piece in bytes.chunks(chunk) {
                dec.push(piece);
                while let Some(m) = dec.next_message::<GuestMessage>().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs, "chunk size {chunk}");
            assert_eq!(dec.pending(), 0);
        }
    }

    #[test]
    fn byte_payloads_are_a_length_and_the_raw_bytes() {
        // The same bytes a sequence of u8 gives, so either side of the change reads the other.
        #[derive(serde::Serialize)]
        struct AsSeq {
            data: Vec<u8>,
        }
        let chunk = GuestMessage::UpperChunk { data: vec![1, 2, 3] };
        let payload = postcard::to_allocvec(&chunk).unwrap();
        assert_eq!(&payload[payload.len() - 4..], &[3, 1, 2, 3]);
        assert!(payload.ends_with(&postcard::to_allocvec(&AsSeq { data: vec![1, 2, 3] }).unwrap()));
        let out = HostMessage::Stdin { id: 1, data: vec![9; 200], close: true };
        assert_eq!(postcard::from_bytes::<HostMessage>(&postcard::to_allocvec(&out).unwrap()).unwrap(), out);
    }

    #[test]
    fn an_upper_chunk_header_and_its_data_are_the_encoded_frame() {
        for n in [0usize, 1, 127, 128, 300, 16_383, 16_384, 1 << 20] {
            let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let mut frame = upper_chunk_header(n).unwrap();
            frame.extend_from_slice(&data);
            assert_eq!(frame, encode_frame(&GuestMessage::UpperChunk { data }).unwrap(), "{n} bytes");
        }
        assert!(matches!(upper_chunk_header(MAX_FRAME_BYTES), Err(ProtocolError::FrameTooLarge { .. })));
    }

    #[test]
    fn rejects_oversized_length_prefix() {
        let mut dec = FrameDecoder::new();
        dec.push(&u32::MAX.to_le_bytes());
        assert!(matches!(dec.next_message::<HostMessage>(), Err(ProtocolError::FrameTooLarge { .. })));
    }

    #[test]
    fn a_lower_limit_refuses_at_the_header_before_the_body_arrives() {
        let frame = encode_frame(&GuestMessage::UpperChunk { data: vec![7u8; 4096] }).unwrap();
        // Within the limit: decodes (the positive control).
        let mut dec = FrameDecoder::with_limit(8192);
        dec.push(&frame);
        assert!(matches!(dec.next_message::<GuestMessage>(), Ok(Some(GuestMessage::UpperChunk { .. }))));
        // Over it: refused from the four header bytes alone, nothing buffered for the body.
        let mut dec = FrameDecoder::with_limit(1024);
        dec.push(&frame[..4]);
        match dec.next_message::<GuestMessage>() {
            Err(ProtocolError::FrameTooLarge { len, max }) => assert_eq!((len, max), (frame.len() - 4, 1024)),
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert!(dec.buf.capacity() < 1024);
        // The limit can only lower the protocol's own.
        assert_eq!(FrameDecoder::with_limit(usize::MAX).limit(), MAX_FRAME_BYTES);
    }

    #[test]
    fn a_half_frame_stays_pending() {
        let frame = encode_frame(&GuestMessage::Spawned { id: 1, pid: 2 }).unwrap();
        let mut dec = FrameDecoder::new();
        dec.push(&frame[..frame.len() - 1]);
        assert!(dec.next_message::<GuestMessage>().unwrap().is_none());
        assert_eq!(dec.pending(), frame.len() - 1);
        dec.push(&frame[frame.len() - 1..]);
        assert_eq!(dec.next_message::<GuestMessage>().unwrap(), Some(GuestMessage::Spawned { id: 1, pid: 2 }));
    }

    #[test]
    fn spawn_debug_hides_env_values() {
        let spawn = crate::Spawn {
            id: 1,
            argv: vec!["env".into()],
            env: vec![("TOKEN".into(), "s3cr3t-value".into())],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            stdin: b"stdin-secret".to_vec(),
            close_stdin: true,
            timeout_ms: None,
            output_limit_bytes: 1,
        };
        let text = format!("{:?}", HostMessage::Spawn(spawn));
        assert!(text.contains("TOKEN"), "{text}");
        assert!(!text.contains("s3cr3t") && !text.contains("stdin-secret"), "{text}");
    }

    #[test]
    fn rejects_garbage_payload() {
        let mut dec = FrameDecoder::new();
        dec.push(&3u32.to_le_bytes());
        dec.push(&[0xff, 0xff, 0xff]);
        assert!(matches!(dec.next_message::<HostMessage>(), Err(ProtocolError::Malformed(_))));
    }
}
