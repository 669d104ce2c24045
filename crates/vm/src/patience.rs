//! Deadlines on the agent's answers that count only the time the guest could have used.
//!
//! A fixed wall-clock deadline mistakes an overloaded host for a hung guest: under TCG a
//! QEMU process that waits for a CPU, or whose disk requests queue behind another tenant's
//! writeback, may take longer than any sensible deadline to answer a `Spawn`, and the run
//! would fail as "crashed". So each tick of a wait is credited only for the part in which
//! QEMU was neither waiting for a CPU (its threads' run delay in `schedstat`) nor the host
//! stalled on I/O (`/proc/pressure/io`), and not at all while frames kept arriving from the
//! guest (the answer may be queued behind them: a guest process can write to the agent's
//! port itself). A hard cap on the clock still bounds every wait, so a guest that never
//! answers is given up on whatever the load or the traffic.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How often a wait re-measures the host while it has not been answered.
const TICK: Duration = Duration::from_millis(500);
/// A wait ends on the clock after this many times its budget, however loaded the host is.
const CAP_FACTOR: u32 = 6;

/// A wait that ran out: how long it took on the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Waited {
    pub wall: Duration,
    /// CPU time QEMU's threads used meanwhile, when measured: a guest that waits on
    /// something (a lock, a disk) uses little; one that spins uses it all.
    pub ran: Option<Duration>,
}

impl Waited {
    /// "20 s", or "20 s of guest time (47 s on the clock)" when the host was loaded; then
    /// what QEMU did meanwhile.
    pub fn describe(self, budget: Duration) -> String {
        let (budget, wall) = (budget.as_secs(), self.wall.as_secs());
        let mut text = if wall > budget {
            format!("{budget} s of guest time ({wall} s on the clock)")
        } else {
            format!("{budget} s")
        };
        if let Some(ran) = self.ran {
            text.push_str(&format!(", QEMU running {:.1} s of it", ran.as_secs_f64()));
        }
        text
    }
}

/// Time the guest could not run, measured between samples.
pub(crate) trait Stalls: Send {
    /// Stall time since the previous call (the first call only sets the baseline).
    fn sample(&mut self) -> Duration;
    /// CPU time the VM used between the first and the last sample, if measured.
    fn ran(&self) -> Option<Duration> {
        None
    }
}

/// How long a wait goes unmeasured: most answers come far sooner, and a sample reads
/// `/proc` for every QEMU thread. That first stretch counts in full as the guest's time.
const UNMEASURED: Duration = Duration::from_millis(50);

/// Waits for `fut` until `budget` of the guest's time has passed, or `budget × 6` of the
/// clock's. A future that is ready within [`UNMEASURED`] is never measured.
pub(crate) async fn within<T>(
    budget: Duration,
    stalls: &mut dyn Stalls,
    fut: impl Future<Output = T>,
) -> Result<T, Waited> {
    let start = Instant::now();
    let cap = start + budget * CAP_FACTOR;
    tokio::pin!(fut);
    tokio::select! {
        v = &mut fut => return Ok(v),
        () = tokio::time::sleep_until(start + UNMEASURED.min(budget)) => {}
    }
    stalls.sample();
    let mut last = Instant::now();
    let mut credited = last - start;
    loop {
        if credited >= budget || last >= cap {
            return Err(Waited { wall: last - start, ran: stalls.ran() });
        }
        let wake = (last + (budget - credited).min(TICK)).min(cap);
        tokio::select! {
            v = &mut fut => return Ok(v),
            () = tokio::time::sleep_until(wake) => {}
        }
        let now = Instant::now();
        credited += (now - last).saturating_sub(stalls.sample());
        last = now;
    }
}

/// The host's measure of a QEMU process: its threads' run delay, the host's I/O stalls and
/// the frames its guest sends.
pub(crate) struct HostStalls<'a> {
    pid: u32,
    /// Frames received from the guest so far, and the count at the last sample.
    received: &'a AtomicU64,
    last_received: u64,
    /// Run time and run delay (ns) per thread at the last sample.
    threads: HashMap<u32, (u64, u64)>,
    /// Run time of QEMU's threads summed over the samples so far.
    ran: Duration,
    /// `some` total (µs) of `/proc/pressure/io` at the last sample.
    io: Option<u64>,
}

impl<'a> HostStalls<'a> {
    pub fn new(pid: u32, received: &'a AtomicU64) -> Self {
        Self {
            pid,
            received,
            last_received: received.load(Ordering::Relaxed),
            threads: HashMap::new(),
            ran: Duration::ZERO,
            io: None,
        }
    }

    /// The largest run-delay growth among QEMU's threads: the vCPU thread's is the one that
    /// matters, and the threads' delays overlap in time, so they are not added up.
    fn cpu(&mut self) -> Duration {
        let now = thread_schedstats(self.pid);
        let mut waited = 0;
        for (tid, (run, delay)) in &now {
            if let Some((was_run, was_delay)) = self.threads.get(tid) {
                self.ran += Duration::from_nanos(run.saturating_sub(*was_run));
                waited = waited.max(delay.saturating_sub(*was_delay));
            }
        }
        self.threads = now;
        Duration::from_nanos(waited)
    }

    fn io(&mut self) -> Duration {
        let now = io_some_total_us();
        let grown = match (self.io, now) {
            (Some(was), Some(now)) => now.saturating_sub(was),
            _ => 0,
        };
        self.io = now;
        Duration::from_micros(grown)
    }
}

impl Stalls for HostStalls<'_> {
    fn sample(&mut self) -> Duration {
        let received = self.received.load(Ordering::Relaxed);
        let talking = std::mem::replace(&mut self.last_received, received) != received;
        // CPU and I/O stalls overlap; the larger one bounds the time the guest lost.
        let lost = self.cpu().max(self.io());
        if talking { Duration::MAX } else { lost }
    }

    fn ran(&self) -> Option<Duration> {
        Some(self.ran)
    }
}

/// Run time and run delay (ns on a CPU, ns waiting on a run queue) of each thread of `pid`,
/// from `schedstat`.
fn thread_schedstats(pid: u32) -> HashMap<u32, (u64, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return HashMap::new() };
    dir.flatten()
        .filter_map(|entry| {
            let tid = entry.file_name().to_str()?.parse().ok()?;
            let text = std::fs::read_to_string(entry.path().join("schedstat")).ok()?;
            Some((tid, parse_schedstat(&text)?))
        })
        .collect()
}

/// `schedstat` is "<run ns> <run-queue wait ns> <timeslices>".
fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    Some((fields.next()?.ok()?, fields.next()?.ok()?))
}

fn io_some_total_us() -> Option<u64> {
    parse_pressure_some(&std::fs::read_to_string("/proc/pressure/io").ok()?)
}

/// The `total=` of the `some` line of a PSI file.
fn parse_pressure_some(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace().find_map(|f| f.strip_prefix("total="))?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loses `share` of every sampled interval.
    struct Loaded {
        share: f64,
        last: Option<Instant>,
    }

    impl Stalls for Loaded {
        fn sample(&mut self) -> Duration {
            let now = Instant::now();
            let lost = self.last.map_or(Duration::ZERO, |was| (now - was).mul_f64(self.share));
            self.last = Some(now);
            lost
        }
    }

    async fn time_out(share: f64) -> Duration {
        let mut stalls = Loaded { share, last: None };
        let waited = within(Duration::from_secs(20), &mut stalls, std::future::pending::<()>()).await;
        waited.expect_err("a pending future times out").wall
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_host_gives_the_budget_on_the_clock() {
        assert_eq!(time_out(0.0).await, Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_loaded_host_stretches_the_wait_by_the_time_the_guest_lost() {
        let wall = time_out(0.75).await;
        assert!(wall >= Duration::from_secs(79) && wall <= Duration::from_secs(81), "{wall:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_that_never_lets_the_guest_run_still_gives_up_at_the_cap() {
        assert_eq!(time_out(1.0).await, Duration::from_secs(120));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_ends_the_wait() {
        let mut stalls = Loaded { share: 0.0, last: None };
        let answer = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            7
        };
        assert_eq!(within(Duration::from_secs(20), &mut stalls, answer).await, Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_quick_answer_is_never_measured() {
        let mut stalls = Loaded { share: 0.0, last: None };
        let answer = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            7
        };
        assert_eq!(within(Duration::from_secs(20), &mut stalls, answer).await, Ok(7));
        assert!(stalls.last.is_none(), "no sample was taken");
    }

    #[test]
    fn describes_guest_time_only_when_it_differs() {
        let budget = Duration::from_secs(20);
        assert_eq!(Waited { wall: Duration::from_millis(20_400), ran: None }.describe(budget), "20 s");
        let loaded = Waited { wall: Duration::from_secs(47), ran: Some(Duration::from_millis(1500)) };
        assert_eq!(loaded.describe(budget), "20 s of guest time (47 s on the clock), QEMU running 1.5 s of it");
    }

    #[test]
    fn parses_schedstat_and_pressure() {
        assert_eq!(parse_schedstat("1017369 2500 1\n"), Some((1_017_369, 2500)));
        let psi = "some avg10=0.00 avg60=0.00 avg300=0.12 total=167670636\nfull avg10=0.00 total=71471987\n";
        assert_eq!(parse_pressure_some(psi), Some(167_670_636));
        assert_eq!(parse_pressure_some("full total=1\n"), None);
    }

    #[test]
    fn this_process_has_measurable_threads() {
        let delays = thread_schedstats(std::process::id());
        assert!(!delays.is_empty(), "schedstat is readable for our own threads");
        let received = AtomicU64::new(0);
        let mut stalls = HostStalls::new(std::process::id(), &received);
        stalls.sample();
        assert!(stalls.sample() < Duration::from_secs(1));
        // Frames from the guest: the whole interval is the guest's own doing, not silence.
        received.fetch_add(1, Ordering::Relaxed);
        assert_eq!(stalls.sample(), Duration::MAX);
        assert!(stalls.sample() < Duration::from_secs(1));
        // Time on a CPU is counted: spin until this thread has run 50 ms by its own CPU
        // clock (on a loaded machine the spin takes longer on the wall clock, no less on it).
        let cpu = || {
            let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
            Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
        };
        let spun = cpu();
        while cpu() - spun < Duration::from_millis(50) {
            std::hint::spin_loop();
        }
        stalls.sample();
        assert!(stalls.ran().unwrap() >= Duration::from_millis(40), "{:?}", stalls.ran());
    }
}
