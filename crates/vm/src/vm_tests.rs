//! The router against a hostile guest, over a socket pair (no VM): the host's own caps on
//! output, frame size, half frames and unexpected messages.

use std::time::Instant;

use boxwood_protocol::{MAX_GUEST_FRAME_BYTES, StreamTotals};
use tokio::net::UnixStream;

use super::*;

struct Harness {
    shared: Arc<Shared>,
    guest: UnixStream,
    _dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let paths = VmPaths::new(dir.path().to_path_buf()).unwrap();
    let (host, guest) = UnixStream::pair().unwrap();
    let (reader, writer) = host.into_split();
    // QEMU "exited" already, so the router does not wait for it when the channel ends.
    let (_tx, exit) = watch::channel(Some("exit status: 0".to_owned()));
    let shared = Arc::new(Shared::new(paths, writer, exit, 1 << 20, std::process::id()));
    tokio::spawn(route(shared.clone(), reader, FrameDecoder::with_limit(MAX_GUEST_FRAME_BYTES)));
    Harness { shared, guest, _dir: dir }
}

/// Registers process `id` as spawned, with output limit `limit`.
fn process(shared: &Shared, id: u32, limit: u64) -> mpsc::UnboundedReceiver<ProcessEvent> {
    let (events, rx) = mpsc::unbounded_channel();
    let slot = Slot { reply: None, events, stdin_open: false, limit, passed: [0; 2], dropped: [0; 2] };
    shared.state().procs.insert(id, slot);
    rx
}

async fn send(guest: &mut UnixStream, msg: &GuestMessage) {
    guest.write_all(&encode_frame(msg).unwrap()).await.unwrap();
}

fn exit(id: u32, agent_says: StreamTotals) -> Exit {
    Exit {
        id,
        pid: 7,
        code: 0,
        signal: -1,
        core_dump: false,
        timed_out: false,
        oom_killed: false,
        duration_us: 1,
        rusage: Default::default(),
        stdout: agent_says,
        stderr: agent_says,
    }
}

/// What a process's event stream delivered: stdout bytes, stderr bytes, and its end.
async fn collect(rx: &mut mpsc::UnboundedReceiver<ProcessEvent>) -> (u64, u64, ProcessEvent) {
    let (mut out, mut err) = (0u64, 0u64);
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.unwrap().unwrap();
        match ev {
            ProcessEvent::Output { stream: OutputStream::Stdout, data } => out += data.len() as u64,
            ProcessEvent::Output { stream: OutputStream::Stderr, data } => err += data.len() as u64,
            end => return (out, err, end),
        }
    }
}

#[tokio::test]
async fn forged_output_past_the_limit_is_dropped_and_counted_by_the_host() {
    let mut h = harness();
    let limit = 100_000;
    let mut rx = process(&h.shared, 1, limit);
    // The guest claims it dropped nothing and sends 50 × 32 KiB on stdout, 1 KiB on stderr.
    for _ in 0..50 {
        send(&mut h.guest, &GuestMessage::Output { id: 1, stream: OutputStream::Stdout, data: vec![b'x'; 32 << 10] })
            .await;
    }
    send(&mut h.guest, &GuestMessage::Output { id: 1, stream: OutputStream::Stderr, data: vec![b'e'; 1024] }).await;
    send(&mut h.guest, &GuestMessage::Exited(exit(1, StreamTotals { emitted: 5, dropped: 0 }))).await;
    let (out, err, end) = collect(&mut rx).await;
    // Within the limit everything arrives (the control); past it nothing does.
    assert_eq!((out, err), (limit, 1024));
    let ProcessEvent::Exited(exit) = end else { panic!("expected Exited, got {end:?}") };
    assert_eq!(exit.stdout, StreamTotals { emitted: limit, dropped: 50 * (32 << 10) - limit });
    assert_eq!(exit.stderr, StreamTotals { emitted: 1024, dropped: 0 });
    assert!(h.shared.check_alive().is_ok());
}

#[tokio::test]
async fn an_oversized_length_header_ends_the_channel_at_once() {
    let mut h = harness();
    let mut rx = process(&h.shared, 1, u64::MAX);
    // A frame at the limit is fine (the control)…
    let ok = GuestMessage::Output { id: 1, stream: OutputStream::Stdout, data: vec![0; MAX_GUEST_FRAME_BYTES - 64] };
    send(&mut h.guest, &ok).await;
    // …a header one past it is refused without waiting for (or buffering) the body.
    let started = Instant::now();
    h.guest.write_all(&u32::try_from(MAX_GUEST_FRAME_BYTES + 1).unwrap().to_le_bytes()).await.unwrap();
    let (out, _, end) = collect(&mut rx).await;
    assert_eq!(out, (MAX_GUEST_FRAME_BYTES - 64) as u64);
    let ProcessEvent::Lost(VmError::Crashed { detail }) = end else { panic!("expected Lost, got {end:?}") };
    assert!(detail.contains("protocol error from the agent: frame of"), "{detail}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(h.shared.check_alive().is_err());
}

#[tokio::test]
async fn a_half_frame_fails_the_channel_within_the_frame_deadline() {
    let mut h = harness();
    let mut rx = process(&h.shared, 1, 1 << 20);
    let frame =
        encode_frame(&GuestMessage::Output { id: 1, stream: OutputStream::Stdout, data: vec![1; 1000] }).unwrap();
    // A whole frame first (the control), then one that stops halfway and never ends.
    h.guest.write_all(&frame).await.unwrap();
    h.guest.write_all(&frame[..500]).await.unwrap();
    let started = Instant::now();
    let (out, _, end) = collect(&mut rx).await;
    assert_eq!(out, 1000);
    let ProcessEvent::Lost(VmError::Crashed { detail }) = end else { panic!("expected Lost, got {end:?}") };
    assert!(detail.contains("a frame stayed incomplete for 5 s"), "{detail}");
    let waited = started.elapsed();
    assert!(waited >= FRAME_DEADLINE - Duration::from_millis(200) && waited < FRAME_DEADLINE * 2, "{waited:?}");
}

#[tokio::test]
async fn a_flood_of_unexpected_messages_ends_the_channel() {
    let mut h = harness();
    let mut rx = process(&h.shared, 1, 1 << 20);
    // A few strays are tolerated (the control): the channel still works after them.
    for _ in 0..10 {
        send(&mut h.guest, &GuestMessage::Spawned { id: 99, pid: 1 }).await;
    }
    send(&mut h.guest, &GuestMessage::Output { id: 1, stream: OutputStream::Stdout, data: vec![1; 10] }).await;
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert!(matches!(first, ProcessEvent::Output { .. }), "{first:?}");
    for _ in 0..MAX_UNEXPECTED {
        send(&mut h.guest, &GuestMessage::Output { id: 42, stream: OutputStream::Stdout, data: vec![1; 10] }).await;
    }
    let (_, _, end) = collect(&mut rx).await;
    let ProcessEvent::Lost(VmError::Crashed { detail }) = end else { panic!("expected Lost, got {end:?}") };
    assert!(detail.contains("unexpected messages"), "{detail}");
}
