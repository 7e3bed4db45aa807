//! The audit trail's event: every decision and every other change of a replica count, as
//! the store keeps it and `/system/scale-events` serves it.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::autoscale::policy::Clamp;
use crate::model::FunctionId;

/// A decision as recorded and served by `/system/scale-events`.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleEvent {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    pub time: DateTime<Utc>,
    pub function: String,
    pub namespace: String,
    pub datacenter: String,
    pub source: String,
    pub from: u64,
    pub to: u64,
    pub recommended: u64,
    pub direction: &'static str,
    pub outcome: Verdict,
    pub reason: String,
    /// The reason in one machine-readable word: the rule that held a change back, or what
    /// asked for it (`Reason::code`); for an event that is no decision, its outcome.
    pub reason_code: &'static str,
    pub clamps: Vec<Clamp>,
    pub evidence: serde_json::Value,
}

/// What became of a signal or what an event records. Decisions' outcomes are declared from the
/// most to the least telling, which sums up one signal applied in several datacenters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// A platform call failed; the sender should retry.
    Failed,
    Scaled,
    /// Shadow mode: recorded, not executed.
    DryRun,
    Held,
    /// Another change won (a newer one, or a stronger signal in the same batch).
    Superseded,
    NoChange,
    UnknownFunction,
    Invalid,
    Ignored,
    // Events that are not decisions.
    Paused,
    Resumed,
    SourceUnavailable,
    SourceRecovered,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Failed => "failed",
            Verdict::Scaled => "scaled",
            Verdict::DryRun => "dry_run",
            Verdict::Held => "held",
            Verdict::Superseded => "superseded",
            Verdict::NoChange => "no_change",
            Verdict::UnknownFunction => "unknown_function",
            Verdict::Invalid => "invalid",
            Verdict::Ignored => "ignored",
            Verdict::Paused => "paused",
            Verdict::Resumed => "resumed",
            Verdict::SourceUnavailable => "source_unavailable",
            Verdict::SourceRecovered => "source_recovered",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ScaleEvent {
    /// A change of `id`'s count in `datacenter` made outside the engine (a spec update that
    /// raises min, a datacenter that left the configuration), carried out as it is recorded.
    #[allow(clippy::too_many_arguments)]
    pub fn change(
        id: &FunctionId,
        datacenter: &str,
        time: DateTime<Utc>,
        source: &str,
        (from, to): (u64, u64),
        reason: String,
        reason_code: &'static str,
        evidence: serde_json::Value,
    ) -> ScaleEvent {
        let mut e = ScaleEvent::about(id, datacenter, time, source, from);
        e.to = to;
        e.recommended = to;
        e.direction = match to.cmp(&from) {
            std::cmp::Ordering::Greater => "up",
            std::cmp::Ordering::Less => "down",
            std::cmp::Ordering::Equal => "none",
        };
        e.outcome = Verdict::Scaled;
        e.reason = reason;
        e.reason_code = reason_code;
        e.evidence = evidence;
        e
    }

    /// An event about `id` in `datacenter` that changes nothing (yet): at `replicas`.
    pub fn about(
        id: &FunctionId,
        datacenter: &str,
        time: DateTime<Utc>,
        source: &str,
        replicas: u64,
    ) -> ScaleEvent {
        ScaleEvent {
            id: None,
            time,
            function: id.name.clone(),
            namespace: id.namespace.clone(),
            datacenter: datacenter.to_string(),
            source: source.to_string(),
            from: replicas,
            to: replicas,
            recommended: replicas,
            direction: "none",
            outcome: Verdict::NoChange,
            reason: String::new(),
            reason_code: "",
            clamps: Vec::new(),
            evidence: serde_json::Value::Null,
        }
    }
}
