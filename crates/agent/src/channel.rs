//! The host channel: a reader thread that turns port bytes into `HostMessage`s and a writer
//! thread that frames `GuestMessage`s. Plain threads with blocking I/O keep the char device
//! out of the async reactor; the rest of the agent talks to them through tokio channels.
//! Bulk streams (the upper-layer tar) bypass the queue and write frames straight to the port
//! through a [`PortWriter`], so their memory use is bounded by one chunk.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use boxwood_protocol::{FrameDecoder, GuestMessage, HostMessage, MAX_FRAME_BYTES, encode_frame, upper_chunk_header};
use tokio::sync::mpsc;

use crate::splice::Splicer;

/// Messages queued for the host. Bounded, so a flood of output waits for the channel.
pub type Outbox = mpsc::Sender<GuestMessage>;

/// The port's write side, shared by the writer thread and bulk senders. Each frame is written
/// whole under the lock, so frames of different senders never interleave.
#[derive(Clone)]
pub struct PortWriter {
    port: Arc<Mutex<File>>,
}

impl PortWriter {
    /// Writes one frame, blocking until the port has taken it (the host's pace).
    pub fn send_blocking(&self, msg: &GuestMessage) -> io::Result<()> {
        let frame = encode_frame(msg).map_err(io::Error::other)?;
        self.port.lock().unwrap_or_else(PoisonError::into_inner).write_all(&frame)
    }

    /// Writes `GuestMessage::UpperChunk { data }` from `data` in place, without copying it
    /// into a frame first.
    pub fn send_upper_chunk(&self, data: &[u8]) -> io::Result<()> {
        let header = upper_chunk_header(data.len()).map_err(io::Error::other)?;
        let mut port = self.port.lock().unwrap_or_else(PoisonError::into_inner);
        port.write_all(&header)?;
        port.write_all(data)
    }

    /// Writes an `UpperChunk` of `len` bytes taken from `file` at its offset (zeros past its
    /// end), moved by `splicer` rather than copied through the agent.
    pub fn send_upper_chunk_from(&self, file: &mut File, len: usize, splicer: &mut Splicer) -> io::Result<()> {
        let header = upper_chunk_header(len).map_err(io::Error::other)?;
        let mut port = self.port.lock().unwrap_or_else(PoisonError::into_inner);
        port.write_all(&header)?;
        splicer.send(file, len, &mut port)
    }
}

/// The agent's ends of the channel.
pub struct Channel {
    pub outbox: Outbox,
    pub inbox: mpsc::UnboundedReceiver<HostMessage>,
    pub writer: PortWriter,
}

/// Starts the reader and writer threads on `port`.
pub fn start(port: File) -> io::Result<Channel> {
    let reader = port.try_clone()?;
    let writer = PortWriter { port: Arc::new(Mutex::new(port)) };
    let (out_tx, out_rx) = mpsc::channel(256);
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let thread_writer = writer.clone();
    std::thread::Builder::new().name("writer".into()).spawn(move || write_loop(&thread_writer, out_rx))?;
    std::thread::Builder::new().name("reader".into()).spawn(move || read_loop(reader, in_tx))?;
    Ok(Channel { outbox: out_tx, inbox: in_rx, writer })
}

/// Sends `Hello` synchronously, before the threads exist: the write blocks until the host
/// has connected to its end of the port.
pub fn send_now(port: &mut File, msg: &GuestMessage) -> io::Result<()> {
    let frame = encode_frame(msg).map_err(io::Error::other)?;
    port.write_all(&frame)
}

fn write_loop(port: &PortWriter, mut rx: mpsc::Receiver<GuestMessage>) {
    while let Some(msg) = rx.blocking_recv() {
        if let Err(err) = port.send_blocking(&msg) {
            crate::log(&format!("channel write failed: {err}"));
        }
    }
}

fn read_loop(mut port: File, tx: mpsc::UnboundedSender<HostMessage>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match port.read(&mut buf) {
            // The host side is not connected (yet, or any more): wait for it.
            Ok(0) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                crate::log(&format!("channel read failed: {err}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        pending.extend_from_slice(&buf[..n]);
        let mut consumed = 0;
        while let Some(len) = frame_len(&pending[consumed..]) {
            if len > MAX_FRAME_BYTES {
                // No resynchronisation marker exists, so the stream is lost for good.
                crate::log(&format!("fatal: host frame of {len} bytes exceeds the limit"));
                crate::power_off();
            }
            let end = consumed + 4 + len;
            if pending.len() < end {
                break;
            }
            // One decoder per frame: a malformed payload is skipped, the stream stays in sync.
            let mut decoder = FrameDecoder::new();
            decoder.push(&pending[consumed..end]);
            consumed = end;
            match decoder.next_message::<HostMessage>() {
                Ok(Some(msg)) => {
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
                Ok(None) => crate::log("protocol error: incomplete frame"),
                Err(err) => crate::log(&format!("protocol error, frame skipped: {err}")),
            }
        }
        pending.drain(..consumed);
    }
}

fn frame_len(buf: &[u8]) -> Option<usize> {
    let prefix: [u8; 4] = buf.get(..4)?.try_into().ok()?;
    Some(u32::from_le_bytes(prefix) as usize)
}
