//! `Debug` without secrets: environment values, token secrets and registry passwords print
//! as `<redacted>`, so a `{:?}` in a log line or an error can never carry them.

use std::fmt;

pub(crate) use boxwood_types::redact::EnvNames;
use boxwood_types::redact::HIDDEN as REDACTED;

/// Pairs (`Vec<(String, String)>`) with their values redacted.
pub(crate) struct PairNames<'a>(pub(crate) &'a [(String, String)]);

impl fmt::Debug for PairNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter().map(|(k, _)| (k, REDACTED))).finish()
    }
}

/// A secret that may be present.
pub(crate) fn secret<T>(v: &Option<T>) -> Option<&'static str> {
    v.as_ref().map(|_| REDACTED)
}
