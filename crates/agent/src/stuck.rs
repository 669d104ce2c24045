//! A watchdog for the step that must not block (starting a command): if it takes more than
//! 10 s, the console gets what each process in the guest waits on (`wchan`, and the kernel
//! stack of those in D state), which the host quotes when it gives up on the agent.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const AFTER: Duration = Duration::from_secs(10);
/// Processes reported at most.
const MAX_REPORTED: usize = 16;

/// When the step being watched began (ms since [`EPOCH`], +1 so that 0 means none), or 0.
static SINCE: AtomicU64 = AtomicU64::new(0);
static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Marks a step as running until dropped. One watchdog thread, started with the first watch,
/// checks every second; a step blocked past [`AFTER`] is reported once.
pub struct Watch(());

impl Watch {
    pub fn start() -> Self {
        let epoch = *EPOCH.get_or_init(|| {
            // Without the thread there is no report, and nothing else changes.
            let _ = std::thread::Builder::new().name("stuck-watch".into()).spawn(watchdog);
            Instant::now()
        });
        SINCE.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        Watch(())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        SINCE.store(0, Ordering::SeqCst);
    }
}

fn watchdog() {
    let mut reported = 0;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let (since, epoch) = (SINCE.load(Ordering::SeqCst), EPOCH.get().copied());
        let Some(epoch) = epoch else { continue };
        let now = epoch.elapsed().as_millis() as u64 + 1;
        if since != 0 && since != reported && now.saturating_sub(since) >= AFTER.as_millis() as u64 {
            reported = since;
            crate::log(&format!(
                "starting a command has been blocked for {} s; processes:\n{}",
                AFTER.as_secs(),
                report()
            ));
        }
    }
}

/// One line per process: pid, state, name and wait channel; the kernel stack of D-state ones.
fn report() -> String {
    let mut lines = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return "(no /proc)".into() };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let read = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
        let stat = read("stat");
        // "pid (comm) S ...": the state follows the last ')'.
        let Some((comm, rest)) = stat.rsplit_once(')') else { continue };
        let state = rest.split_whitespace().next().unwrap_or("?");
        let comm = comm.split_once('(').map_or("?", |(_, c)| c);
        // Kernel threads (no cmdline) that sleep normally are noise.
        if read("cmdline").is_empty() && state != "D" {
            continue;
        }
        lines.push(format!("{pid} {state} {comm} wchan={}", read("wchan")));
        if state == "D" {
            lines.extend(read("stack").lines().take(12).map(|l| format!("    {l}")));
        }
        if lines.len() >= MAX_REPORTED * 4 {
            break;
        }
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_processes_with_their_state_and_wait_channel() {
        let me = std::process::id().to_string();
        let text = report();
        let line = text.lines().find(|l| l.split(' ').next() == Some(me.as_str()));
        let line = line.unwrap_or_else(|| panic!("{me} in:\n{text}"));
        assert!(line.contains(" wchan="), "{line}");
    }

    #[test]
    fn a_watch_marks_its_step_until_dropped() {
        let watch = Watch::start();
        assert_ne!(SINCE.load(Ordering::SeqCst), 0);
        drop(watch);
        assert_eq!(SINCE.load(Ordering::SeqCst), 0);
    }
}
