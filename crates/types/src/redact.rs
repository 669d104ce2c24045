//! `Debug` without secrets: environment values, stdin and registry passwords print as
//! `<redacted>`, so a `{:?}` in a log line or an error can never carry them.

use std::fmt;

pub const HIDDEN: &str = "<redacted>";

/// An environment's names with its values redacted.
pub struct EnvNames<'a, I>(pub &'a I);

impl<'a, I, K, V> fmt::Debug for EnvNames<'a, I>
where
    &'a I: IntoIterator<Item = (K, V)>,
    K: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.into_iter().map(|(k, _)| (k, HIDDEN))).finish()
    }
}
