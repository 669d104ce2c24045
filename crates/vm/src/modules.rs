//! Kernel module selection: resolving the guest's needed modules and their dependencies
//! from `modules.dep` into a load order.

use std::collections::{HashMap, HashSet};

use crate::VmError;

/// Modules the agent needs: virtio-mmio transport, the agent's serial port, block disks,
/// erofs lower layers, overlayfs and the NIC. Dependencies are added from `modules.dep`.
pub const NEEDED_MODULES: &[&str] = &["virtio_mmio", "virtio_console", "virtio_blk", "erofs", "overlay", "virtio_net"];

/// Canonical module name of a `modules.dep` path: basename without `.ko*`, `-` → `_`.
pub fn module_name(path: &str) -> String {
    module_stem(path).replace('-', "_")
}

/// Basename of a module path without its `.ko` / `.ko.xz` / … suffix, spelled as on disk.
pub(crate) fn module_stem(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.find(".ko").map_or(base, |i| &base[..i])
}

/// Parsed `modules.dep`: module name → (path, direct dependency paths), and the names of
/// drivers built into the kernel (`modules.builtin`), which need no loading.
#[derive(Debug, Default)]
pub struct ModulesDep {
    entries: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

impl ModulesDep {
    pub fn parse(text: &str) -> Self {
        let mut entries = HashMap::new();
        for line in text.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim();
            if path.is_empty() {
                continue;
            }
            let deps = deps.split_whitespace().map(str::to_owned).collect();
            entries.insert(module_name(path), (path.to_owned(), deps));
        }
        Self { entries, builtin: HashSet::new() }
    }

    /// Adds the drivers listed in a `modules.builtin` file.
    pub fn add_builtin(&mut self, text: &str) {
        self.builtin.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(module_name));
    }

    /// Paths (relative to the modules dir) of `wanted` and all their dependencies, each
    /// after everything it depends on.
    pub fn resolve(&self, wanted: &[&str]) -> Result<Vec<String>, VmError> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        let mut active = HashSet::new();
        for name in wanted {
            self.visit(&module_name(name), &mut order, &mut done, &mut active)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        order: &mut Vec<String>,
        done: &mut HashSet<String>,
        active: &mut HashSet<String>,
    ) -> Result<(), VmError> {
        if done.contains(name) || (self.builtin.contains(name) && !self.entries.contains_key(name)) {
            return Ok(());
        }
        if !active.insert(name.to_owned()) {
            return Err(VmError::Assets(format!("module dependency cycle through {name}")));
        }
        let (path, deps) =
            self.entries.get(name).ok_or_else(|| VmError::Assets(format!("module {name} not in modules.dep")))?;
        for dep in deps {
            self.visit(&module_name(dep), order, done, active)?;
        }
        active.remove(name);
        done.insert(name.to_owned());
        order.push(path.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/overlayfs/overlay.ko:
kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko
kernel/lib/libcrc32c.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
";

    fn names(paths: &[String]) -> Vec<String> {
        paths.iter().map(|p| module_name(p)).collect()
    }

    #[test]
    fn resolves_dependencies_first_without_duplicates() {
        let dep = ModulesDep::parse(DEP);
        let order = dep.resolve(NEEDED_MODULES).unwrap();
        assert_eq!(
            names(&order),
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_console",
                "virtio_blk",
                "libcrc32c",
                "erofs",
                "overlay",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
        assert_eq!(order[0], "kernel/drivers/virtio/virtio_ring.ko");
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(module_name("kernel/arch/x86/crypto/crc32c-intel.ko"), "crc32c_intel");
        assert_eq!(module_name("a/b/zstd.ko.xz"), "zstd");
        let dep = ModulesDep::parse(DEP);
        assert_eq!(dep.resolve(&["crc32c-intel"]).unwrap(), ["kernel/arch/x86/crypto/crc32c-intel.ko"]);
    }

    #[test]
    fn built_in_drivers_are_skipped() {
        // Debian 13's cloud kernel: virtio and virtio_console built in, the rest `.ko.xz`.
        let mut dep = ModulesDep::parse(
            "kernel/drivers/virtio/virtio_mmio.ko.xz:\n\
             kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz\n\
             kernel/lib/libcrc32c.ko.xz:\n",
        );
        assert!(dep.resolve(&["virtio_console"]).is_err(), "unknown until the builtin list is read");
        dep.add_builtin("kernel/drivers/char/virtio_console.ko\nkernel/drivers/virtio/virtio.ko\n");
        let order = dep.resolve(&["virtio_console", "virtio_mmio", "erofs"]).unwrap();
        assert_eq!(names(&order), ["virtio_mmio", "libcrc32c", "erofs"]);
        assert!(dep.resolve(&["overlay"]).is_err(), "neither a file nor built in");
    }

    #[test]
    fn missing_module_and_cycle_are_errors() {
        let dep = ModulesDep::parse(DEP);
        assert!(matches!(dep.resolve(&["nope"]), Err(VmError::Assets(_))));
        let cyc = ModulesDep::parse("a.ko: b.ko\nb.ko: a.ko\n");
        let err = cyc.resolve(&["a"]).unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");
    }
}
