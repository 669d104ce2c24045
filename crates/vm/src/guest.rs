//! Bounds and checks on what the guest reports. The guest's root can forge any agent message,
//! so every string and list it sends is cut to a size the host is willing to keep, log or
//! quote before it leaves this crate.

use boxwood_protocol::{Hello, SetupReport};

use crate::VmError;

/// Longest guest-supplied text kept (error messages, names), in bytes.
pub(crate) const MAX_TEXT_BYTES: usize = 1024;
/// Most network interfaces a setup report may list.
const MAX_INTERFACES: usize = 16;

/// `s` cut to [`MAX_TEXT_BYTES`] at a character boundary, marked when cut.
pub(crate) fn text(mut s: String) -> String {
    if s.len() > MAX_TEXT_BYTES {
        let mut end = MAX_TEXT_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("… (cut)");
    }
    s
}

/// A setup report with its strings and lists bounded.
pub(crate) fn bounded_report(mut report: SetupReport) -> SetupReport {
    report.boot_id = text(std::mem::take(&mut report.boot_id));
    if let Some(net) = &mut report.network {
        net.interfaces.truncate(MAX_INTERFACES);
        for i in &mut net.interfaces {
            i.name = text(std::mem::take(&mut i.name));
        }
        net.error = net.error.take().map(text);
        for s in [&mut net.configured.address, &mut net.configured.gateway, &mut net.configured.nameserver] {
            *s = text(std::mem::take(s));
        }
    }
    report
}

/// A `Hello` with its strings bounded.
pub(crate) fn bounded_hello(mut hello: Hello) -> Hello {
    hello.kernel_release = text(hello.kernel_release);
    hello.machine = text(hello.machine);
    hello.boot_id = text(hello.boot_id);
    hello.clock_events = text(hello.clock_events);
    hello
}

/// Refuses a guest whose kernel ticks on anything but its local APIC timer. On a microvm the
/// only other candidate is a fallback that stops: Linux gives the APIC timer up when its
/// calibration measures it "too slow", which happens under TCG when the host keeps the vCPU
/// off the CPU as calibration starts, and then every sleep in the guest hangs (the agent
/// would take its first `Spawn` and never answer). Empty means the agent could not tell.
pub(crate) fn check_timer(hello: &Hello) -> Result<(), VmError> {
    let device = hello.clock_events.as_str();
    if device.is_empty() || device.starts_with("lapic") {
        Ok(())
    } else {
        Err(VmError::NoTimer { clock_events: device.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_apic_timer_is_a_running_tick() {
        let hello = |dev: &str| Hello {
            version: 0,
            kernel_release: String::new(),
            machine: String::new(),
            boot_id: String::new(),
            clock_events: dev.into(),
        };
        for ok in ["lapic", "lapic-deadline", ""] {
            assert!(check_timer(&hello(ok)).is_ok(), "{ok:?}");
        }
        for bad in ["none", "pit", "hpet"] {
            let err = check_timer(&hello(bad)).unwrap_err();
            assert!(matches!(&err, VmError::NoTimer { clock_events } if clock_events == bad), "{err}");
        }
    }

    #[test]
    fn long_text_is_cut_at_a_char_boundary() {
        assert_eq!(text("short".into()), "short");
        let long = "é".repeat(MAX_TEXT_BYTES);
        let cut = text(long);
        assert!(cut.len() <= MAX_TEXT_BYTES + "… (cut)".len());
        assert!(cut.ends_with("… (cut)"));
    }
}
