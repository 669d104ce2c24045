//! Template clones: restoring one (QEMU with `-incoming defer`, guest RAM mapped copy-on-write
//! from the template's file, device state loaded over QMP), warming it up, and assigning it
//! to a run: the run's layers go behind the disk slots, the NIC's link comes up only if the run
//! wants networking, then `Setup` brings a fresh clock, entropy and the root filesystem.

use std::sync::Arc;
use std::time::Duration;

use boxwood_protocol::{RootfsSpec, UpperDisk};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::jail::Inherited;
use crate::qemu::{Devices, SCRATCH_NODE, SLOTS, VmPaths, check_serial, slot_nodes, slot_serial};
use crate::qmp::{Qmp, is_migration_status};
use crate::runtime::{
    Base, BootChannel, DirGuard, Shape, boot_err, check_hostname, check_name, fail_boot, foreground, into_vm,
};
use crate::scratch::{PLACEHOLDER_BYTES, SCRATCH_SERIAL};
use crate::stale::ORIGIN_FILE;
use crate::template::{SLOT_BYTES, Template};
use crate::vm::{QemuChild, QemuVm};
use crate::{VmError, VmSpec};

/// A running clone that has not been given to a run yet.
pub(crate) struct Restored {
    pub paths: VmPaths,
    /// Dropping it SIGKILLs QEMU.
    pub qemu: QemuChild,
    chan: BootChannel,
    qmp: Qmp,
    template: Arc<Template>,
    /// Removes the scratch dir if the clone is dropped unused.
    guard: DirGuard,
    /// QEMU runs at background priority.
    background: bool,
    /// The clone's scratch disk (QEMU has its own fd): a placeholder until [`Self::warm_up`]
    /// or [`Self::assign`] fills and grows it.
    scratch: std::fs::File,
    scratch_bases: Arc<crate::scratch::Bases>,
    /// The size of the filesystem the warm-up left mounted on the scratch disk, if any.
    prepared: Option<u64>,
}

/// Starts a clone of `template` named `name` (its scratch dir), returning once the guest runs.
/// `background`: a pool refill, run at low CPU priority until assigned.
pub(crate) async fn restore(
    base: &Base,
    template: Arc<Template>,
    name: &str,
    limit: Duration,
    background: bool,
) -> Result<Restored, VmError> {
    let lease = base.lease_uid()?;
    let (paths, guard) = base.create_vm_dir(name, lease.as_ref())?;
    let mut inherited = Inherited::default();
    let ram = template.ram_copy.try_clone().map_err(|e| VmError::io("dup the template RAM", e))?;
    let scratch = crate::scratch::unlinked_file(&paths.dir, PLACEHOLDER_BYTES)?;
    let devices = Devices::Fixed {
        ram: inherited.add(ram),
        shared_ram: false,
        slot_image: inherited.open(&template.slot_image)?,
        warm_image: inherited.open(&template.warm_image)?,
        scratch: inherited.add(scratch.try_clone().map_err(|e| VmError::io("dup the scratch disk", e))?),
        incoming: true,
    };
    // QEMU's sandbox forbids `exec:`: the state comes from an inherited fd.
    let state = inherited.open(&template.state)?;
    let shape = Shape { accel: base.accel, memory_mib: template.memory_mib, vcpus: template.vcpus };
    let argv = base.argv(shape, &mut inherited, devices)?;
    let qemu = base.spawn_qemu(argv, &paths, background, inherited, lease, shape)?;
    let deadline = Instant::now() + limit;
    let loaded = async {
        // The agent socket is connected before the device state loads, so the restored guest
        // finds its port's host side connected, as it was when the template was saved.
        let (chan, qmp) = tokio::join!(
            BootChannel::connect(&paths, &qemu, deadline),
            Qmp::connect(&paths.qmp_sock, deadline, || qemu.exited().is_none())
        );
        let (chan, mut qmp) = (chan?, qmp?);
        // `x-ignore-shared` must be set on this side too (QEMU 7.2 has no command-line way),
        // or the load fails; `events` gives the MIGRATION events waited for below.
        let caps = json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": true},
            {"capability": "events", "state": true},
        ]});
        let uri = format!("fd:{state}");
        qmp.execute_batch(&[("migrate-set-capabilities", Some(caps)), ("migrate-incoming", Some(json!({"uri": uri})))])
            .await?;
        let ev = qmp.wait_event(|e| is_migration_status(e, &["completed", "failed", "cancelled"])).await?;
        if !is_migration_status(&ev, &["completed"]) {
            return Err(boot_err(&format!("restoring the template failed: {ev}")));
        }
        // The template was running when saved, so QEMU resumes the clone by itself; RESUME
        // comes after the block nodes are active again, which `assign` needs.
        qmp.wait_event(|e| e.get("event").and_then(Value::as_str) == Some("RESUME")).await?;
        Ok::<_, VmError>((chan, qmp))
    };
    match loaded.await {
        Ok((chan, qmp)) => {
            let scratch_bases = base.scratch.clone();
            Ok(Restored { paths, qemu, chan, qmp, template, guard, background, scratch, scratch_bases, prepared: None })
        }
        Err(e) => Err(fail_boot(e, &paths, &qemu).await),
    }
}

/// How a spec's disks map onto the template's slots: the rootfs to send in `Setup` (serials
/// replaced by slot serials). `None` when the spec cannot run in a clone (more disks than
/// slots, a disk larger than a slot, other memory or vCPUs than the template): it cold-boots.
pub(crate) fn clone_plan(spec: &VmSpec, template: &Template) -> Result<Option<RootfsSpec>, VmError> {
    if spec.disks.len() > SLOTS
        || spec.memory_mib.is_some_and(|m| m != template.memory_mib)
        || spec.vcpus.is_some_and(|v| v != template.vcpus)
    {
        return Ok(None);
    }
    for disk in &spec.disks {
        check_serial(&disk.serial)?;
        // A missing file cold-boots too, so the error reads as it always has.
        match std::fs::metadata(&disk.path) {
            Ok(m) if m.is_file() && m.len() <= SLOT_BYTES => {}
            _ => return Ok(None),
        }
    }
    let mut lower_serials = Vec::with_capacity(spec.rootfs.lower_serials.len());
    for serial in &spec.rootfs.lower_serials {
        let slot = spec
            .disks
            .iter()
            .position(|d| &d.serial == serial)
            .ok_or_else(|| VmError::Invalid(format!("rootfs layer {serial:?} is not among the disks")))?;
        lower_serials.push(slot_serial(slot));
    }
    Ok(Some(RootfsSpec { lower_serials, ..spec.rootfs.clone() }))
}

impl Restored {
    /// Runs `Warmup` in the guest. A warm-up that did not fully work fails: the clone might
    /// not be in the state a run's `Setup` expects (its root still mounted, say).
    /// `upper_bytes`: the scratch disk is made this size and left mounted, so a run of that
    /// size finds it ready.
    pub async fn warm_up(&mut self, limit: Duration, upper_bytes: Option<u64>) -> Result<(), VmError> {
        let deadline = Instant::now() + limit;
        self.qmp.set_deadline(deadline);
        let upper = match upper_bytes {
            Some(bytes) => {
                self.remake_scratch(Some(bytes)).await?;
                Some(UpperDisk { serial: SCRATCH_SERIAL.to_owned(), bytes })
            }
            None => None,
        };
        match self.chan.warm_up(&self.qemu, deadline, upper).await? {
            None => {
                self.prepared = upper_bytes;
                Ok(())
            }
            Some(error) => Err(VmError::Boot { reason: format!("warm-up failed: {error}"), detail: String::new() }),
        }
    }

    /// Makes the scratch disk, which the guest does not have mounted, anew from zeros: an
    /// empty filesystem of `want` bytes, or the placeholder (so no run writes more than its
    /// own cap to the raw disk); then tells QEMU, which tells the guest, its new size.
    async fn remake_scratch(&mut self, want: Option<u64>) -> Result<(), VmError> {
        let disk = self.scratch.try_clone().map_err(|e| VmError::io("dup the scratch disk", e))?;
        disk.set_len(0).map_err(|e| VmError::io("empty the scratch disk", e))?;
        let size = match want {
            Some(bytes) => {
                self.scratch_bases.fill(disk, bytes).await?;
                bytes
            }
            None => {
                disk.set_len(PLACEHOLDER_BYTES).map_err(|e| VmError::io("empty the scratch disk", e))?;
                PLACEHOLDER_BYTES
            }
        };
        self.qmp.execute_batch(&[("block_resize", Some(json!({"node-name": SCRATCH_NODE, "size": size})))]).await?;
        Ok(())
    }

    /// Makes the scratch disk what a run wants: a filesystem of `want` bytes, or the
    /// placeholder. A disk the warm-up prepared at that size is used as it is; one prepared
    /// at another is released by the guest (it unmounts it) and remade.
    async fn make_scratch(&mut self, want: Option<u64>, deadline: Instant) -> Result<(), VmError> {
        match self.prepared {
            Some(_) if self.prepared == want => return Ok(()),
            Some(_) => {
                self.prepared = None;
                self.chan.release_upper(&self.qemu, deadline).await?;
            }
            // The placeholder, which the guest never used.
            None if want.is_none() => return Ok(()),
            None => {}
        }
        self.remake_scratch(want).await
    }

    /// Moves a pooled clone's scratch dir to `run_dir/<name>`, where a VM of that name is
    /// expected (and `reap_stale` finds it). The sockets are connected and the logs open, so
    /// QEMU does not notice; `origin` keeps the old path, which QEMU's command line mentions.
    fn adopt_name(&mut self, name: &str) -> Result<(), VmError> {
        check_name(name)?;
        let run_dir = self.paths.dir.parent().unwrap_or(std::path::Path::new("/"));
        let target = VmPaths::new(run_dir.join(name))?;
        if target.dir == self.paths.dir {
            return Ok(());
        }
        let origin = self.paths.dir.as_os_str().as_encoded_bytes().to_vec();
        std::fs::write(self.paths.dir.join(ORIGIN_FILE), origin).map_err(|e| VmError::io("write origin", e))?;
        let renamed = nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &self.paths.dir,
            nix::fcntl::AT_FDCWD,
            &target.dir,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        );
        match renamed {
            Ok(()) => {}
            Err(nix::errno::Errno::EEXIST) => {
                return Err(VmError::Invalid(format!("VM dir {} already exists", target.dir.display())));
            }
            Err(e) => return Err(VmError::io(format!("rename to {}", target.dir.display()), e.into())),
        }
        self.guard.dir.clone_from(&target.dir);
        self.paths = target;
        Ok(())
    }

    /// Gives the clone to `spec`'s run: attaches its disks behind the slots (each slot's qcow2
    /// gets the layer file as its backing file; the virtual size, all the guest knows of a
    /// disk, stays the same), brings the NIC's link up if the run wants networking, and sends
    /// `Setup`. `started`: when the caller asked for the VM.
    pub async fn assign(
        mut self,
        spec: &VmSpec,
        mut rootfs: RootfsSpec,
        scratch_size: Option<u64>,
        extra_ca: Option<&str>,
        limit: Duration,
        started: Instant,
    ) -> Result<QemuVm, VmError> {
        check_hostname(&spec.hostname)?;
        if self.background {
            foreground(self.qemu.pid);
        }
        self.adopt_name(&spec.name)?;
        let deadline = Instant::now() + limit;
        self.qmp.set_deadline(deadline);
        let mut commands: Vec<(&str, Option<Value>)> = Vec::new();
        let mut reopen = Vec::new();
        // The server opens each layer; QEMU gets only the fd (its uid could not open the
        // path, and no other layer is reachable to it).
        let mut layers = Vec::with_capacity(spec.disks.len());
        for disk in &spec.disks {
            layers.push(
                std::fs::File::open(&disk.path).map_err(|e| VmError::io(format!("open {}", disk.path.display()), e))?,
            );
        }
        let mut fdsets = Vec::with_capacity(layers.len());
        let added = async {
            for layer in &layers {
                let r = self.qmp.execute_with_fd("add-fd", json!({}), std::os::fd::AsFd::as_fd(layer)).await?;
                let set =
                    r.get("fdset-id").and_then(Value::as_u64).ok_or_else(|| VmError::Qmp(format!("add-fd: {r}")))?;
                fdsets.push(set);
            }
            Ok::<_, VmError>(())
        }
        .await;
        if let Err(e) = added {
            return Err(fail_boot(e, &self.paths, &self.qemu).await);
        }
        for (i, set) in fdsets.iter().enumerate() {
            let layer = format!("layer{i}");
            let filename = format!("/dev/fdset/{set}");
            commands.push((
                "blockdev-add",
                Some(json!({"driver": "file", "node-name": layer, "filename": filename, "read-only": true})),
            ));
            let (node, file_node) = slot_nodes(i);
            reopen.push(json!({"driver": "qcow2", "node-name": node, "file": file_node, "backing": layer,
                               "read-only": true}));
        }
        if !reopen.is_empty() {
            commands.push(("blockdev-reopen", Some(json!({"options": reopen}))));
        }
        if spec.network {
            commands.push(("set_link", Some(json!({"name": "net0", "up": true}))));
        }
        let t0 = Instant::now();
        if let Err(e) = self.make_scratch(scratch_size, deadline).await {
            return Err(fail_boot(e, &self.paths, &self.qemu).await);
        }
        if let Some(bytes) = scratch_size {
            rootfs.upper_size_bytes = bytes;
            rootfs.upper_disk = Some(SCRATCH_SERIAL.to_owned());
        }
        let filled_at = t0.elapsed();
        let mut qmp_at = filled_at;
        let result = async {
            if !commands.is_empty() {
                self.qmp.execute_batch(&commands).await?;
            }
            qmp_at = t0.elapsed();
            self.chan.setup(spec, rootfs, extra_ca, &self.qemu, deadline).await
        }
        .await;
        tracing::debug!(
            vm = spec.name,
            scratch_ms = filled_at.as_secs_f64() * 1e3,
            qmp_ms = (qmp_at - filled_at).as_secs_f64() * 1e3,
            setup_ms = (t0.elapsed() - qmp_at).as_secs_f64() * 1e3,
            "clone assignment phases"
        );
        let report = match result {
            Ok(r) => r,
            Err(e) => return Err(fail_boot(e, &self.paths, &self.qemu).await),
        };
        let mut hello = self.template.hello.clone();
        hello.boot_id.clone_from(&report.boot_id);
        let boot_duration = started.elapsed();
        tracing::info!(vm = spec.name, template = self.template.key, ms = boot_duration.as_millis(), "VM cloned");
        self.guard.armed = false;
        let scratch = scratch_size.map(|_| self.scratch);
        Ok(into_vm(spec, hello, report, boot_duration, self.qemu, self.paths, self.chan, true, scratch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DiskSpec;

    fn template(dir: &std::path::Path) -> Template {
        crate::template::test_template(dir, 256, 1)
    }

    #[test]
    fn plans_map_serials_to_slots() {
        let dir = tempfile::tempdir().unwrap();
        let t = template(dir.path());
        let (a, b) = (dir.path().join("a.erofs"), dir.path().join("b.erofs"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let mut spec = VmSpec {
            name: "x".into(),
            disks: vec![
                DiskSpec { path: a.clone(), serial: "layer0".into() },
                DiskSpec { path: b.clone(), serial: "layer1".into() },
            ],
            rootfs: RootfsSpec {
                lower_serials: vec!["layer1".into(), "layer0".into()],
                upper_size_bytes: 7,
                upper_disk: None,
            },
            hostname: "h".into(),
            memory_mib: None,
            vcpus: None,
            network: false,
            upper_on_disk: true,
        };
        let plan = clone_plan(&spec, &t).unwrap().unwrap();
        let want = RootfsSpec {
            lower_serials: vec!["bwslot1".into(), "bwslot0".into()],
            upper_size_bytes: 7,
            upper_disk: None,
        };
        assert_eq!(plan, want);

        spec.rootfs.lower_serials.push("nope".into());
        assert!(clone_plan(&spec, &t).is_err(), "a layer that is not a disk");
        spec.rootfs.lower_serials.pop();
        for other in [Some(512), Some(256)] {
            let s = VmSpec { memory_mib: other, ..spec.clone() };
            assert_eq!(clone_plan(&s, &t).unwrap().is_some(), other == Some(256));
        }
        let s = VmSpec { vcpus: Some(2), ..spec.clone() };
        assert!(clone_plan(&s, &t).unwrap().is_none(), "other vCPUs cold-boot");
        let mut s = spec.clone();
        s.disks = (0..=SLOTS).map(|i| DiskSpec { path: a.clone(), serial: format!("l{i}") }).collect();
        s.rootfs.lower_serials.clear();
        assert!(clone_plan(&s, &t).unwrap().is_none(), "more disks than slots cold-boot");
        let mut s = spec.clone();
        s.disks[0].path = dir.path().join("missing");
        assert!(clone_plan(&s, &t).unwrap().is_none(), "a missing file cold-boots (and fails as before)");
    }
}
