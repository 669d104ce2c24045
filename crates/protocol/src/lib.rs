//! Host↔guest wire protocol: the messages the Boxwood server and the in-VM agent exchange
//! over a virtio-serial port, and their framing.
//!
//! # Framing
//! Every frame is a little-endian `u32` payload length followed by the payload, a
//! [postcard](https://docs.rs/postcard) encoding of [`HostMessage`] (host → guest) or
//! [`GuestMessage`] (guest → host). A payload longer than [`MAX_FRAME_BYTES`] is a protocol
//! error: the channel carries no recovery marker, so the reader must drop the connection.
//!
//! # Conversation
//! 1. The agent opens the port named [`PORT_NAME`] and sends [`GuestMessage::Hello`].
//! 2. The host answers with [`HostMessage::Setup`]; the agent replies
//!    [`GuestMessage::SetupDone`] with a [`SetupReport`] (or [`GuestMessage::SetupFailed`]).
//! 3. The host sends any number of [`HostMessage::Spawn`]s; each process is named by a
//!    host-chosen `id` (the Contree `spid`) and yields `Spawned`/`SpawnFailed`, `Output`
//!    chunks and finally `Exited`.
//! 4. Before a run, [`HostMessage::PutFile`] chunks inject uploaded files; after it,
//!    [`HostMessage::ExportUpper`] streams the run's filesystem changes back as a tar.
//! 5. [`HostMessage::Shutdown`] makes the agent sync and power the VM off.
//!
//! A VM restored from a snapshot taken right after `Hello` (a fast-start clone) skips step 1:
//! the host already has the template's `Hello`, may send [`HostMessage::Warmup`] before
//! `Setup`, and `Setup` re-seeds the clone's RNG and clock.
//!
//! # Disk-referenced files in the export
//! When the upper directory lives on the run's scratch disk (an ext4 filesystem on the
//! whole virtio disk the host made), a large regular file's data need not travel through the
//! channel at all: the host holds the disk. Such a member carries the PAX record
//! [`DISK_EXTENTS_RECORD`]`=<apparent size>` and, as its data, an extent map instead of the
//! file's bytes: decimal lines — the number of extents, then per extent its offset in the
//! file, its offset on the disk and its length — zero-padded to a 512-byte block. Offsets not
//! covered are holes. The host reads the extents from its own handle of the disk, after
//! checking the map (in order, apart, within the file and the disk); the guest's claims can
//! only point it at bytes the guest could have written anyway.
//!
//! The protocol is versioned by [`PROTOCOL_VERSION`]; the host refuses a `Hello` whose version
//! differs, because both ends are built from the same workspace.

mod codec;
mod messages;

pub use codec::{FrameDecoder, ProtocolError, encode_frame, upper_chunk_header};
pub use messages::*;

/// Version carried in [`Hello`]; bump on any incompatible message change.
pub const PROTOCOL_VERSION: u32 = 9;

/// PAX record of a disk-referenced export member (see the crate docs); its value is the
/// file's apparent size.
pub const DISK_EXTENTS_RECORD: &str = "BOXWOOD.disk.realsize";

/// Process id of the process [`HostMessage::Warmup`] spawns (never a run's: runs count up
/// from 0).
pub const WARMUP_ID: u32 = u32::MAX;

/// Name of the virtio-serial port (`virtserialport,name=…`) the agent talks on.
pub const PORT_NAME: &str = "boxwood.agent";

/// Largest payload a frame may carry.
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// Largest payload the host accepts from the guest: the biggest message the agent sends is
/// an [`GuestMessage::UpperChunk`] of 1 MiB, so anything much larger is a forged frame.
pub const MAX_GUEST_FRAME_BYTES: usize = (1 << 20) + 4096;

/// Largest chunk of process output the agent puts in one [`GuestMessage::Output`].
pub const OUTPUT_CHUNK_BYTES: usize = 32 * 1024;
