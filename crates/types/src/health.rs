//! Who the caller is (`GET /whoami`) and whether the server takes work (`GET /readyz`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET /readyz`: whether this server can take work now, check by check (no numbers, no
/// paths: the probe needs no token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: ReadinessChecks,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadinessChecks {
    /// A write to the metadata store commits.
    pub store: Check,
    /// Free space on the state dir's filesystem is above the reserve (and not zero).
    pub disk: Check,
    /// Fast start: `building` is not ready yet; `cold_boot` (no template could be made) and
    /// `off` still serve, more slowly.
    pub template: TemplateCheck,
    /// New runs are accepted (not shutting down).
    pub runs: Check,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    Ok,
    Failing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateCheck {
    Building,
    Ready,
    ColdBoot,
    Off,
}

impl ReadinessChecks {
    /// The names of the checks that fail.
    pub fn failing(&self) -> Vec<&'static str> {
        [
            ("store", self.store == Check::Ok),
            ("disk", self.disk == Check::Ok),
            ("template", self.template != TemplateCheck::Building),
            ("runs", self.runs == Check::Ok),
        ]
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| name)
        .collect()
    }
}

/// `WhoAmIResponse`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WhoAmI {
    pub token_uuid: String,
    pub token_expiration: Option<i64>,
    pub permissions: BTreeMap<String, bool>,
    pub limits: BTreeMap<String, i64>,
    pub operations_stat: BTreeMap<String, i64>,
}
