//! A watchdog for the step that must not block (starting a command): if it takes more than
//! 10 s, the console gets what each process in the guest waits on (`wchan`, and the kernel
//! stack of those in D state), which the host quotes when it gives up on the agent.

use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

const AFTER: Duration = Duration::from_secs(10);
/// Processes reported at most.
const MAX_REPORTED: usize = 16;

/// Marks a step as running until dropped. One watchdog thread, started with the first watch,
/// sleeps until a step begins and then at most until [`AFTER`] (an idle guest pays no
/// wake-ups); a step blocked past it is reported once.
pub struct Watch(Arc<Watchdog>);

impl Watch {
    pub fn start() -> Self {
        static DOG: OnceLock<Arc<Watchdog>> = OnceLock::new();
        let dog = DOG.get_or_init(|| {
            let dog = Arc::new(Watchdog::new(AFTER));
            let run = dog.clone();
            // Without the thread there is no report, and nothing else changes.
            let _ = std::thread::Builder::new().name("stuck-watch".into()).spawn(move || {
                run.run(|text| {
                    crate::log(&format!(
                        "starting a command has been blocked for {} s; processes:\n{text}",
                        AFTER.as_secs()
                    ))
                })
            });
            dog
        });
        dog.begin();
        Watch(dog.clone())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// The step being watched (a count, so that two steps in a row are told apart) and when it
/// began.
struct Watchdog {
    after: Duration,
    step: Mutex<(u64, Option<Instant>)>,
    changed: Condvar,
}

impl Watchdog {
    fn new(after: Duration) -> Self {
        Self { after, step: Mutex::new((0, None)), changed: Condvar::new() }
    }

    fn begin(&self) {
        let mut step = self.step.lock().unwrap_or_else(PoisonError::into_inner);
        *step = (step.0 + 1, Some(Instant::now()));
        self.changed.notify_all();
    }

    fn end(&self) {
        self.step.lock().unwrap_or_else(PoisonError::into_inner).1 = None;
        self.changed.notify_all();
    }

    /// Waits for steps forever; `tell` gets the report of one blocked past `after`.
    fn run(&self, tell: impl Fn(&str)) {
        let mut step = self.step.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            step = self.changed.wait_while(step, |s| s.1.is_none()).unwrap_or_else(PoisonError::into_inner);
            let (n, Some(began)) = *step else { continue };
            let same = |s: &mut (u64, Option<Instant>)| s.0 == n && s.1.is_some();
            let left = self.after.saturating_sub(began.elapsed());
            step = self.changed.wait_timeout_while(step, left, same).unwrap_or_else(PoisonError::into_inner).0;
            if same(&mut step) {
                drop(step);
                tell(&report());
                step = self.step.lock().unwrap_or_else(PoisonError::into_inner);
                step = self.changed.wait_while(step, same).unwrap_or_else(PoisonError::into_inner);
            }
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
    fn a_step_blocked_past_its_limit_is_reported_once_and_a_quick_one_never() {
        let dog = Arc::new(Watchdog::new(Duration::from_millis(100)));
        let (tx, rx) = std::sync::mpsc::channel();
        let run = dog.clone();
        let tx = Mutex::new(tx);
        std::thread::spawn(move || run.run(|text| tx.lock().unwrap().send(text.to_owned()).unwrap()));
        dog.begin();
        dog.end();
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "a step that ended is not reported");
        dog.begin();
        let text = rx.recv_timeout(Duration::from_secs(5)).expect("a blocked step is reported");
        assert!(text.contains(" wchan="), "{text}");
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "and only once");
        dog.end();
    }
}
