//! MCP progress notifications while a tool waits on a long operation, for clients that asked
//! for them (a `progressToken` in the request's `_meta`): they show the agent's user that the
//! run is alive, and let a client that extends its timeout on progress keep waiting.

use std::future::Future;
use std::time::{Duration, Instant};

use rmcp::model::{ProgressNotificationParam, ProgressToken, RequestMetaObject};
use rmcp::{Peer, RoleServer};

/// How often a waiting tool reports.
const EVERY: Duration = Duration::from_secs(1);

/// Where a tool's progress goes: the caller and the token it gave.
pub struct Progress {
    peer: Peer<RoleServer>,
    token: ProgressToken,
}

impl Progress {
    /// The caller's progress channel, if its request carried a token.
    pub fn of(meta: &RequestMetaObject, peer: Peer<RoleServer>) -> Option<Self> {
        meta.get_progress_token().map(|token| Self { peer, token })
    }
}

/// Awaits `work`, sending `progress` (if any) the seconds waited so far every [`EVERY`], out
/// of `total_secs` when there is a bound, with `what` and the count as the message.
pub async fn reporting<F: Future>(
    progress: Option<Progress>,
    what: &str,
    total_secs: Option<f64>,
    work: F,
) -> F::Output {
    let Some(progress) = progress else { return work.await };
    tokio::pin!(work);
    let started = Instant::now();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = ticks.tick() => {
                let waited = started.elapsed().as_secs();
                let mut note = ProgressNotificationParam::new(progress.token.clone(), waited as f64)
                    .with_message(format!("{what}: {waited} s"));
                if let Some(total) = total_secs {
                    note = note.with_total(total);
                }
                // A client that went away stops hearing; the work goes on until it ends.
                let _ = progress.peer.notify_progress(note).await;
            }
        }
    }
}
