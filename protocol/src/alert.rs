//! The alert model: what a store holds and what operators see.
//!
//! An alert is keyed by its `identifier`. Field names are part of the operator contract: they are
//! the JSON keys of `tandem alerts --json` and the names the filter language knows, so they are
//! snake_case and never renamed.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A point in time: milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// How bad an alert is: 0 clear, 1 indeterminate, 2 warning, 3 minor, 4 major, 5 critical.
///
/// The value is checked on every decode, so a `Severity` always holds 0..=5.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(try_from = "u8", into = "u8")]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Severity(#[cfg_attr(test, proptest(strategy = "0u8..=5"))] u8);

/// A severity outside 0..=5 was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("severity {0} is out of range: use 0 (clear) to 5 (critical)")]
pub struct SeverityOutOfRange(pub u8);

impl Severity {
    pub const CLEAR: Severity = Severity(0);
    pub const INDETERMINATE: Severity = Severity(1);
    pub const WARNING: Severity = Severity(2);
    pub const MINOR: Severity = Severity(3);
    pub const MAJOR: Severity = Severity(4);
    pub const CRITICAL: Severity = Severity(5);

    /// Checks the range; the only way to build a severity from a number.
    pub fn new(value: u8) -> Result<Self, SeverityOutOfRange> {
        if value <= 5 {
            Ok(Severity(value))
        } else {
            Err(SeverityOutOfRange(value))
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }

    pub fn is_clear(self) -> bool {
        self.0 == 0
    }

    /// The conventional name, for tables and logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "clear",
            1 => "indeterminate",
            2 => "warning",
            3 => "minor",
            4 => "major",
            _ => "critical",
        }
    }
}

impl TryFrom<u8> for Severity {
    type Error = SeverityOutOfRange;
    fn try_from(value: u8) -> Result<Self, Self::Error> {
        Severity::new(value)
    }
}

impl From<Severity> for u8 {
    fn from(s: Severity) -> u8 {
        s.0
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an event says about the thing it watches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Kind {
    /// Something is wrong.
    #[default]
    Problem,
    /// Something is fine again: clears itself and the matching earlier problems.
    Resolution,
    /// Worth knowing, neither a problem nor a resolution.
    Information,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Problem => "problem",
            Kind::Resolution => "resolution",
            Kind::Information => "information",
        }
    }
}

/// An operator's note on an alert.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct JournalEntry {
    pub time: Millis,
    pub user: String,
    pub text: String,
}

/// What a probe reports about one occurrence: the alert fields a source can set.
///
/// The store derives the rest (serial, tally, occurrence times, state change, acknowledgement).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AlertFields {
    pub identifier: String,
    pub node: String,
    pub node_alias: String,
    pub manager: String,
    pub agent: String,
    pub alert_group: String,
    pub alert_key: String,
    pub summary: String,
    pub class: String,
    pub kind: Kind,
    pub severity: Severity,
    /// Seconds after the last occurrence at which the alert is cleared; 0 never expires.
    pub expire_seconds: u32,
    pub extra: BTreeMap<String, String>,
}

/// An alert as a store presents it to operators and queries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Alert {
    pub identifier: String,
    /// Store-local row number: differs between the two stores, never use it as a cursor.
    pub serial: u64,
    /// The store that first inserted the alert, and its serial there.
    pub server_name: String,
    pub server_serial: u64,
    pub node: String,
    pub node_alias: String,
    pub manager: String,
    pub agent: String,
    pub alert_group: String,
    pub alert_key: String,
    pub summary: String,
    pub class: String,
    pub kind: Kind,
    pub severity: Severity,
    pub first_occurrence: Millis,
    pub last_occurrence: Millis,
    pub state_change: Millis,
    pub tally: u64,
    pub acknowledged: bool,
    pub owner: String,
    pub expire_seconds: u32,
    pub extra: BTreeMap<String, String>,
    pub journal: Vec<JournalEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_rejects_out_of_range_values() {
        assert_eq!(Severity::new(5).map(Severity::get), Ok(5));
        assert_eq!(Severity::new(6), Err(SeverityOutOfRange(6)));
        let err = serde_json::from_str::<Severity>("9").unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    #[test]
    fn alert_json_uses_the_contract_field_names() {
        let alert = Alert {
            identifier: "web1:ping".into(),
            severity: Severity::MAJOR,
            ..Alert::default()
        };
        let json = serde_json::to_value(&alert).unwrap();
        for key in [
            "identifier",
            "serial",
            "server_name",
            "server_serial",
            "node",
            "node_alias",
            "manager",
            "agent",
            "alert_group",
            "alert_key",
            "summary",
            "class",
            "kind",
            "severity",
            "first_occurrence",
            "last_occurrence",
            "state_change",
            "tally",
            "acknowledged",
            "owner",
            "expire_seconds",
            "extra",
            "journal",
        ] {
            assert!(json.get(key).is_some(), "missing {key} in {json}");
        }
        assert_eq!(json["severity"], 4);
        assert_eq!(json["kind"], "problem");
    }
}
