//! The fold: how one event changes one alert's state, independent of arrival order.
//!
//! Every rule here is commutative and idempotent-free by construction (exactly-once is the
//! table's job), so two stores that fold the same set of events in any order hold the same
//! state (G3):
//! - fields set by several kinds of event (severity, acknowledgement, owner, the newest
//!   occurrence's fields) keep the value written by the highest [`Version`];
//! - the tally is a per-origin count of occurrence events; a delete records, per origin, the
//!   counts it saw, and deletes combine by maximum, so occurrences a delete did not see keep the
//!   alert alive;
//! - first and last occurrence are the minimum and maximum occurrence time, state change the
//!   latest event time; journal entries form a sorted set;
//! - where the alert was first inserted is the occurrence with the lowest version.
//!
//! Generic clear assumes what every probe rule produces: an identifier's node, alert key, alert
//! group, manager and kind do not change between its occurrences (they are what the identifier
//! is made of). An identifier that changes them converges in all but `state_change`.

use std::sync::Arc;

use thin_vec::ThinVec;

use tandem_protocol::{
    Alert, AlertState, EventBody, JournalEntry, Kind, Millis, Origin, OriginCount, PackedFields,
    Severity, Version, Versioned,
};

/// Keeps `value` if `version` beats the one `slot` holds.
pub fn propose<T>(slot: &mut Versioned<T>, value: T, version: &Version) -> bool {
    if *version > slot.version {
        slot.value = value;
        slot.version = version.clone();
        true
    } else {
        false
    }
}

/// [`propose`] that hands back the value that lost (the old one, or `value` itself), for the
/// caller to free where it costs less.
fn propose_swap<T>(slot: &mut Versioned<T>, value: T, version: &Version) -> T {
    if *version > slot.version {
        slot.version = version.clone();
        std::mem::replace(&mut slot.value, value)
    } else {
        value
    }
}

fn bump(counts: &mut ThinVec<OriginCount>, origin: &Origin, by: u64) {
    // From the newest: origins are appended as they first appear, the one sending now is
    // usually the last, and an alert can have a count for every probe run that ever sent it.
    match counts.iter_mut().rev().find(|c| c.origin == *origin) {
        Some(c) => c.count += by,
        None => counts.push(OriginCount {
            origin: origin.clone(),
            count: by,
        }),
    }
}

fn raise(counts: &mut ThinVec<OriginCount>, origin: &Origin, to: u64) {
    match counts.iter_mut().rev().find(|c| c.origin == *origin) {
        Some(c) => c.count = c.count.max(to),
        None => counts.push(OriginCount {
            origin: origin.clone(),
            count: to,
        }),
    }
}

/// Occurrences not removed by a delete: the alert's tally; zero means the alert is gone.
pub fn tally(state: &AlertState) -> u64 {
    state
        .occurrences
        .iter()
        .map(|occ| {
            let deleted = state
                .deleted
                .iter()
                .find(|d| d.origin == occ.origin)
                .map_or(0, |d| d.count);
            occ.count.saturating_sub(deleted)
        })
        .sum()
}

pub fn is_alive(state: &AlertState) -> bool {
    // `tally(state) > 0`, stopping at the first origin with occurrences left: asked twice for
    // every event applied.
    state.occurrences.iter().any(|occ| {
        let deleted = state
            .deleted
            .iter()
            .find(|d| d.origin == occ.origin)
            .map_or(0, |d| d.count);
        occ.count > deleted
    })
}

/// The key a resolution clears by: node, alert key, alert group and manager.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClearKey(Arc<str>);

impl ClearKey {
    pub fn of(fields: &PackedFields) -> ClearKey {
        // \u{1f} (unit separator) cannot be confused with text in any of the four fields.
        let key = format!(
            "{}\u{1f}{}\u{1f}{}\u{1f}{}",
            fields.node(),
            fields.alert_key(),
            fields.alert_group(),
            fields.manager()
        );
        ClearKey(key.into())
    }

    /// Whether `fields` have this key, without building it.
    pub fn matches(&self, fields: &PackedFields) -> bool {
        let mut parts = self.0.split('\u{1f}');
        [
            fields.node(),
            fields.alert_key(),
            fields.alert_group(),
            fields.manager(),
        ]
        .iter()
        .all(|f| parts.next() == Some(*f))
            && parts.next().is_none()
    }

    /// The four parts: node, alert key, alert group, manager.
    pub fn parts(&self) -> [&str; 4] {
        let mut parts = self.0.split('\u{1f}');
        let mut next = || parts.next().unwrap_or("");
        [next(), next(), next(), next()]
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    pub fn from_bytes(bytes: &[u8]) -> ClearKey {
        ClearKey(String::from_utf8_lossy(bytes).into())
    }
}

/// Folds an occurrence into `state`. `inserted_at` is where this event entered the pair (the
/// store name and the alert's serial there), a candidate for `server_name`/`server_serial`.
/// Returns the copy of the fields the row does not keep (the old newest, or `fields` when
/// they are older, or equal in value), to be freed on the thread that decoded the event: the
/// connection's that sent it (`engine::Leftovers`), or the commit thread for a peer's
/// replicated entries, or else the freeing thread.
pub fn occurrence(
    state: &mut AlertState,
    fields: PackedFields,
    version: &Version,
    inserted_at: (&str, u64),
) -> PackedFields {
    let first_ever = state.occurrences.is_empty();
    bump(&mut state.occurrences, &version.origin, 1);
    let time = version.time;
    if first_ever {
        state.first_occurrence = time;
        state.last_occurrence = time;
    } else {
        state.first_occurrence = state.first_occurrence.min(time);
        state.last_occurrence = state.last_occurrence.max(time);
    }
    touch(state, time);
    let severity = if fields.kind == Kind::Resolution {
        Severity::CLEAR
    } else {
        fields.severity
    };
    propose(&mut state.severity, severity, version);
    // The fields keep their copy of the identifier (the row's key has another): dropping it
    // would take a second allocation and copy, and it costs the row a few bytes.
    // A repeat of the same fields, the usual case for a deduplicated alert, keeps the row's
    // copy and hands back the one just decoded: that one is still in cache for the thread that
    // frees it, the row's may have been out of it for a while (docs/PERFORMANCE.md).
    let displaced = if *version > state.latest.version && state.latest.value == fields {
        state.latest.version = version.clone();
        fields
    } else {
        propose_swap(&mut state.latest, fields, version)
    };
    merge_inserted(state, version, inserted_at);
    displaced
}

/// Offers `(store, serial)` as where the alert was first inserted. Also called for an
/// occurrence that is a duplicate here: when a probe's resend reached both stores directly,
/// each recorded itself, and only this merge makes them agree.
pub fn merge_inserted(state: &mut AlertState, version: &Version, inserted_at: (&str, u64)) {
    let (name, serial) = inserted_at;
    let unset = state.inserted.value.0.is_empty();
    let wins = unset
        || *version < state.inserted.version
        || (*version == state.inserted.version && name < &*state.inserted.value.0);
    if wins {
        state.inserted = Versioned {
            // Shared: every row names one of the pair's two stores.
            value: (tandem_protocol::shared_name(name), serial),
            version: version.clone(),
        };
    }
}

/// A resolution with version `clear` reached this alert by its clear key.
///
/// The state change moves to the resolution's time even when a newer write keeps the
/// severity: whether the clear "changed" anything depends on arrival order, its time does not.
pub fn generic_clear(state: &mut AlertState, clear: &Version) -> bool {
    if state.latest.value.kind != Kind::Problem {
        return false;
    }
    touch(state, clear.time);
    propose(&mut state.severity, Severity::CLEAR, clear)
}

fn touch(state: &mut AlertState, time: Millis) {
    state.state_change = state.state_change.max(time);
}

/// Folds an event that is not an occurrence.
pub fn action(state: &mut AlertState, body: &EventBody, version: &Version) {
    match body {
        EventBody::Occurrence(_) => {}
        EventBody::Acknowledge { acknowledged, .. } => {
            propose(&mut state.acknowledged, *acknowledged, version);
        }
        EventBody::SetOwner { owner, .. } => {
            propose(&mut state.owner, owner.as_str().into(), version);
        }
        EventBody::SetSeverity { severity, .. } => {
            propose(&mut state.severity, *severity, version);
        }
        EventBody::Journal { user, text, .. } => {
            let entry = JournalEntry {
                time: version.time,
                user: user.clone(),
                text: text.clone(),
            };
            if let Err(at) = state.journal.binary_search(&entry) {
                state.journal.insert(at, entry);
            }
        }
        EventBody::Expire { .. } => {
            propose(&mut state.severity, Severity::CLEAR, version);
        }
        EventBody::Delete { seen, .. } => {
            for count in seen.iter().flatten() {
                raise(&mut state.deleted, &count.origin, count.count);
            }
        }
    }
    touch(state, version.time);
}

/// Folds `other` into `state` when the events behind the two are not known: per field the
/// newer version, per origin the larger count.
///
/// Exact when, for every origin, one side's events include the other's; where both sides
/// hold occurrences of one origin that the other lacks, the tally is the larger side's, never
/// more than the truth. A full resync uses it only when the receiver's own log no longer
/// reaches back far enough to replay exactly what the sender lacks.
pub fn join(state: &mut AlertState, other: AlertState) {
    if !other.inserted.value.0.is_empty() {
        let (name, serial) = &other.inserted.value;
        merge_inserted(state, &other.inserted.version, (name, *serial));
    }
    let had_occurrences = !state.occurrences.is_empty();
    propose(&mut state.latest, other.latest.value, &other.latest.version);
    propose(
        &mut state.severity,
        other.severity.value,
        &other.severity.version,
    );
    propose(
        &mut state.acknowledged,
        other.acknowledged.value,
        &other.acknowledged.version,
    );
    propose(&mut state.owner, other.owner.value, &other.owner.version);
    if other.occurrences.is_empty() {
        // Nothing to take from times that no occurrence set.
    } else if had_occurrences {
        state.first_occurrence = state.first_occurrence.min(other.first_occurrence);
        state.last_occurrence = state.last_occurrence.max(other.last_occurrence);
    } else {
        state.first_occurrence = other.first_occurrence;
        state.last_occurrence = other.last_occurrence;
    }
    state.state_change = state.state_change.max(other.state_change);
    for count in &other.occurrences {
        raise(&mut state.occurrences, &count.origin, count.count);
    }
    for count in &other.deleted {
        raise(&mut state.deleted, &count.origin, count.count);
    }
    for entry in other.journal {
        if let Err(at) = state.journal.binary_search(&entry) {
            state.journal.insert(at, entry);
        }
    }
}

/// The operator's view of an alert.
pub fn to_alert(identifier: &str, serial: u64, state: &AlertState) -> Alert {
    let f = &state.latest.value;
    Alert {
        identifier: identifier.to_string(),
        serial,
        server_name: state.inserted.value.0.to_string(),
        server_serial: state.inserted.value.1,
        node: f.node().to_string(),
        node_alias: f.node_alias().to_string(),
        manager: f.manager().to_string(),
        agent: f.agent().to_string(),
        alert_group: f.alert_group().to_string(),
        alert_key: f.alert_key().to_string(),
        summary: f.summary().to_string(),
        class: f.class().to_string(),
        kind: f.kind,
        severity: state.severity.value,
        first_occurrence: state.first_occurrence,
        last_occurrence: state.last_occurrence,
        state_change: state.state_change,
        tally: tally(state),
        acknowledged: state.acknowledged.value,
        owner: state.owner.value.to_string(),
        expire_seconds: f.expire_seconds,
        extra: f.extra().clone(),
        journal: state.journal.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(time: Millis, seq: u64) -> Version {
        Version {
            time,
            origin: Origin::new("p", 1),
            seq,
        }
    }

    fn fields(severity: u8, summary: &str) -> PackedFields {
        tandem_protocol::AlertFields {
            identifier: "a".into(),
            summary: summary.into(),
            severity: Severity::new(severity).unwrap(),
            ..Default::default()
        }
        .pack()
    }

    /// A repeat with the same fields keeps the row's own copy and gives back the new one (the
    /// one just decoded, still in cache for whoever frees it), with the newer version taken.
    #[test]
    fn a_repeat_with_the_same_fields_keeps_the_rows_copy() {
        let mut s = AlertState::default();
        occurrence(&mut s, fields(3, "disk full"), &v(10, 1), ("AGG_P", 1));
        let kept = s.latest.value.summary().as_ptr();
        let repeat = fields(3, "disk full");
        let sent = repeat.summary().as_ptr();
        let displaced = occurrence(&mut s, repeat, &v(20, 2), ("AGG_P", 2));
        assert_eq!(displaced.summary().as_ptr(), sent);
        assert_eq!(s.latest.value.summary().as_ptr(), kept);
        assert_eq!(s.latest.version, v(20, 2));
        assert_eq!(tally(&s), 2);
        // Different fields replace the row's.
        let changed = fields(3, "disk fuller");
        let displaced = occurrence(&mut s, changed, &v(30, 3), ("AGG_P", 3));
        assert_eq!(displaced.summary().as_ptr(), kept);
        assert_eq!(s.latest.value.summary(), "disk fuller");
    }

    #[test]
    fn a_late_occurrence_counts_but_does_not_overwrite() {
        let mut s = AlertState::default();
        occurrence(&mut s, fields(5, "new"), &v(20, 2), ("AGG_P", 1));
        occurrence(&mut s, fields(2, "old"), &v(10, 1), ("AGG_P", 1));
        assert_eq!(tally(&s), 2);
        assert_eq!(s.latest.value.summary(), "new");
        assert_eq!(s.severity.value, Severity::CRITICAL);
        assert_eq!((s.first_occurrence, s.last_occurrence), (10, 20));
    }

    #[test]
    fn a_delete_removes_only_what_it_saw() {
        let mut s = AlertState::default();
        occurrence(&mut s, fields(3, "x"), &v(1, 1), ("AGG_P", 1));
        occurrence(&mut s, fields(3, "x"), &v(2, 2), ("AGG_P", 1));
        let seen = vec![OriginCount {
            origin: Origin::new("p", 1),
            count: 2,
        }];
        let delete = EventBody::Delete {
            identifier: "a".into(),
            seen: Some(seen),
        };
        action(
            &mut s,
            &delete,
            &Version {
                time: 3,
                origin: Origin::new("op", 9),
                seq: 1,
            },
        );
        assert!(!is_alive(&s));
        occurrence(&mut s, fields(3, "x"), &v(4, 3), ("AGG_P", 1));
        assert_eq!(
            tally(&s),
            1,
            "an occurrence the delete did not see keeps it alive"
        );
    }

    #[test]
    fn the_lowest_version_names_the_inserting_store() {
        let mut s = AlertState::default();
        occurrence(&mut s, fields(3, "x"), &v(5, 2), ("AGG_B", 7));
        occurrence(&mut s, fields(3, "x"), &v(4, 1), ("AGG_P", 3));
        assert_eq!(s.inserted.value, (Arc::from("AGG_P"), 3));
    }
}

#[cfg(test)]
mod alive_tests {
    use proptest::prelude::*;

    use super::*;

    fn counts(origins: &[u64]) -> Vec<OriginCount> {
        origins
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, &count)| OriginCount {
                origin: Origin::new(format!("p{i}"), 1),
                count,
            })
            .collect()
    }

    proptest! {
        /// The short-circuiting aliveness check agrees with the tally it stands for.
        #[test]
        fn alive_means_a_positive_tally(
            seen in prop::collection::vec(0u64..4, 0..4),
            deleted in prop::collection::vec(0u64..4, 0..4),
        ) {
            let state = AlertState {
                occurrences: counts(&seen).into(),
                deleted: counts(&deleted).into(),
                ..AlertState::default()
            };
            prop_assert_eq!(is_alive(&state), tally(&state) > 0);
        }
    }
}
