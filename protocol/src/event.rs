//! Events: the only way an alert changes.
//!
//! Every change, whether a probe's occurrence, an operator's action or a store's housekeeping, is
//! an [`Event`] named by `(origin, seq)`. Stores apply each name at most once (exactly-once, G2)
//! and order competing writes by [`Version`] so that every store reaches the same table whatever
//! order it sees the events in (G3).

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::alert::{AlertFields, Millis, Severity};

/// The writer of an event: a probe instance, an operator command or a store's housekeeping.
///
/// `epoch` is chosen when the writer's sequence space is created (a probe's spool, a store's data
/// directory), so a writer that loses its spool starts a new origin instead of reusing numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Origin {
    /// Shared: every event and version of one writer points at the same name.
    #[cfg_attr(test, proptest(strategy = "\"[a-z0-9_-]{0,12}\".prop_map(Arc::from)"))]
    pub name: Arc<str>,
    pub epoch: u64,
}

impl Origin {
    pub fn new(name: impl Into<Arc<str>>, epoch: u64) -> Self {
        Origin {
            name: name.into(),
            epoch,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{:x}", self.name, self.epoch)
    }
}

/// The total order that decides which of two writes to a field wins: later event time first,
/// then origin, then sequence number. No two distinct events share a version.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Version {
    pub time: Millis,
    pub origin: Origin,
    pub seq: u64,
}

/// How many occurrences of an alert one origin had contributed when a delete was issued.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct OriginCount {
    pub origin: Origin,
    pub count: u64,
}

/// One change to the alert table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Event {
    pub origin: Origin,
    /// Grows by one per event of `origin`, starting at 1.
    pub seq: u64,
    /// When the event happened at its source (for an occurrence, its occurrence time).
    pub time: Millis,
    pub body: EventBody,
}

impl Event {
    pub fn version(&self) -> Version {
        Version {
            time: self.time,
            origin: self.origin.clone(),
            seq: self.seq,
        }
    }

    /// The alert this event is about.
    pub fn identifier(&self) -> &str {
        match &self.body {
            EventBody::Occurrence(fields) => &fields.identifier,
            EventBody::Acknowledge { identifier, .. }
            | EventBody::SetOwner { identifier, .. }
            | EventBody::SetSeverity { identifier, .. }
            | EventBody::Journal { identifier, .. }
            | EventBody::Expire { identifier }
            | EventBody::Delete { identifier, .. } => identifier,
        }
    }
}

/// What an event does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum EventBody {
    /// A probe saw something: inserts the alert or deduplicates into it (tally + 1). A
    /// resolution also clears the earlier problems with the same node, alert key, alert group
    /// and manager.
    Occurrence(AlertFields),
    Acknowledge {
        identifier: String,
        acknowledged: bool,
        user: String,
    },
    SetOwner {
        identifier: String,
        owner: String,
    },
    SetSeverity {
        identifier: String,
        severity: Severity,
    },
    Journal {
        identifier: String,
        user: String,
        text: String,
    },
    /// Housekeeping: the alert's `expire_seconds` have passed; it becomes clear.
    Expire {
        identifier: String,
    },
    /// Removes the occurrences the deleter saw. `seen` is `None` only on the way in from an
    /// operator; the store that accepts the delete fills in its own counts before logging it, so
    /// every store subtracts exactly the same occurrences.
    Delete {
        identifier: String,
        seen: Option<Vec<OriginCount>>,
    },
}

#[cfg(test)]
use proptest::strategy::Strategy as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_time_then_origin_then_seq() {
        let v = |time, name: &str, seq| Version {
            time,
            origin: Origin::new(name, 1),
            seq,
        };
        assert!(v(2, "a", 1) > v(1, "z", 9));
        assert!(v(1, "b", 1) > v(1, "a", 9));
        assert!(v(1, "a", 2) > v(1, "a", 1));
    }
}
