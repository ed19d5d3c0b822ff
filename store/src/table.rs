//! The in-memory alert table: rows, per-origin applied sets and the generic-clear index.
//!
//! The table decides *whether* an event applies (exactly-once by `(origin, seq)`) and routes it
//! to the fold; it records what it changed so the engine can write exactly those records in the
//! commit's batch. It does no I/O.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tandem_protocol::state::SeqRanges;
use tandem_protocol::{Alert, AlertState, Event, EventBody, Kind, Origin, OriginCount, Version};

use crate::fold::{self, ClearKey};

/// Longest identifier accepted, in bytes.
pub const MAX_IDENTIFIER: usize = 1024;

/// One alert's state and its store-local serial.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub serial: u64,
    pub state: AlertState,
}

/// What a commit must write: the records an apply touched.
#[derive(Debug, Default)]
pub struct Changes {
    pub rows: HashSet<Arc<str>>,
    pub origins: HashSet<Origin>,
    pub clears: HashSet<ClearKey>,
}

impl Changes {
    pub fn clear(&mut self) {
        self.rows.clear();
        self.origins.clear();
        self.clears.clear();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
}

/// Why an event is refused before anything is applied.
pub fn validate(event: &Event) -> Result<(), String> {
    let id = event.identifier();
    if id.is_empty() {
        return Err("the event has no identifier: set \"identifier\" to a non-empty string".into());
    }
    if id.len() > MAX_IDENTIFIER {
        return Err(format!(
            "the identifier is {} bytes long; the limit is {MAX_IDENTIFIER}",
            id.len()
        ));
    }
    if event.origin.name.is_empty() {
        return Err("the event's origin has no name".into());
    }
    if event.seq == 0 {
        return Err("the event's seq is 0; sequence numbers start at 1".into());
    }
    if event.time < 0 {
        return Err(format!(
            "the event's time {} is before 1970; times are milliseconds since the Unix epoch",
            event.time
        ));
    }
    Ok(())
}

#[derive(Debug, Default)]
pub struct Table {
    name: Arc<str>,
    rows: HashMap<Arc<str>, Row>,
    applied: HashMap<Origin, SeqRanges>,
    clears: HashMap<ClearKey, Version>,
    by_clear: HashMap<ClearKey, Vec<Arc<str>>>,
    next_serial: u64,
    alive: u64,
}

impl Table {
    pub fn new(name: &str) -> Table {
        Table {
            name: name.into(),
            next_serial: 1,
            ..Table::default()
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Alerts that exist (tally above zero).
    pub fn alive(&self) -> u64 {
        self.alive
    }

    pub fn next_serial(&self) -> u64 {
        self.next_serial
    }

    pub fn row(&self, identifier: &str) -> Option<&Row> {
        self.rows.get(identifier)
    }

    pub fn applied(&self, origin: &Origin) -> Option<&SeqRanges> {
        self.applied.get(origin)
    }

    pub fn clear_version(&self, key: &ClearKey) -> Option<&Version> {
        self.clears.get(key)
    }

    pub fn applied_sets(&self) -> impl Iterator<Item = (&Origin, &SeqRanges)> {
        self.applied.iter()
    }

    /// Rows, alive or not, with their identifiers.
    pub fn rows(&self) -> impl Iterator<Item = (&Arc<str>, &Row)> {
        self.rows.iter()
    }

    /// The alerts that exist, as operators see them.
    pub fn alerts(&self) -> impl Iterator<Item = Alert> + '_ {
        self.rows
            .iter()
            .filter(|(_, row)| fold::is_alive(&row.state))
            .map(|(id, row)| fold::to_alert(id, row.serial, &row.state))
    }

    /// Whether `(origin, seq)` has been applied.
    pub fn seen(&self, origin: &Origin, seq: u64) -> bool {
        self.applied
            .get(origin)
            .is_some_and(|set| set.contains(seq))
    }

    /// Restores a row at start-up.
    pub fn load_row(&mut self, identifier: &str, row: Row) {
        let id: Arc<str> = identifier.into();
        if fold::is_alive(&row.state) {
            self.alive += 1;
        }
        self.next_serial = self.next_serial.max(row.serial + 1);
        if row.state.latest.value.kind == Kind::Problem && !row.state.occurrences.is_empty() {
            let key = ClearKey::of(&row.state.latest.value);
            self.by_clear.entry(key).or_default().push(id.clone());
        }
        self.rows.insert(id, row);
    }

    pub fn load_applied(&mut self, origin: Origin, set: SeqRanges) {
        self.applied.insert(origin, set);
    }

    pub fn load_clear(&mut self, key: ClearKey, version: Version) {
        self.clears.insert(key, version);
    }

    pub fn set_next_serial(&mut self, next: u64) {
        self.next_serial = self.next_serial.max(next);
    }

    /// Fills in what an operator's delete saw: this store's occurrence counts now.
    pub fn resolve_delete(&self, event: &mut Event) {
        if let EventBody::Delete { identifier, seen } = &mut event.body {
            if seen.is_none() {
                let counts: Vec<OriginCount> = self
                    .rows
                    .get(identifier.as_str())
                    .map(|row| row.state.occurrences.clone())
                    .unwrap_or_default();
                *seen = Some(counts);
            }
        }
    }

    /// The row for `identifier`, created (with the next serial) when missing.
    fn row_mut(&mut self, identifier: &str) -> (Arc<str>, &mut Row) {
        let id = match self.rows.get_key_value(identifier) {
            Some((id, _)) => id.clone(),
            None => {
                let id: Arc<str> = identifier.into();
                let serial = self.next_serial;
                self.next_serial += 1;
                self.rows.insert(
                    id.clone(),
                    Row {
                        serial,
                        state: AlertState::default(),
                    },
                );
                id
            }
        };
        let row = self.rows.entry(id.clone()).or_default();
        (id, row)
    }

    /// Applies `event` at most once. `source` is where it entered the pair: `None` for here,
    /// or the peer store's name and the alert's serial there for a replicated entry.
    pub fn apply(
        &mut self,
        event: &Event,
        source: Option<(&str, u64)>,
        changes: &mut Changes,
    ) -> Outcome {
        let version = event.version();
        let fresh = self
            .applied
            .entry(event.origin.clone())
            .or_default()
            .insert(event.seq);
        if !fresh {
            if let (EventBody::Occurrence(_), Some(at)) = (&event.body, source) {
                // Another store may have recorded itself as the inserter of this very event.
                if let Some(row) = self.rows.get_mut(event.identifier()) {
                    let before = row.state.inserted.clone();
                    fold::merge_inserted(&mut row.state, &version, at);
                    if row.state.inserted != before {
                        changes.rows.insert(event.identifier().into());
                    }
                }
            }
            return Outcome::Duplicate;
        }
        changes.origins.insert(event.origin.clone());

        let own_name = self.name.clone();
        let (id, row) = self.row_mut(event.identifier());
        let was_alive = fold::is_alive(&row.state);
        let mut clear_targets = None;
        match &event.body {
            EventBody::Occurrence(fields) => {
                let at = source.unwrap_or((&*own_name, row.serial));
                fold::occurrence(&mut row.state, fields, &version, at);
                let key = ClearKey::of(&row.state.latest.value);
                match fields.kind {
                    Kind::Resolution => clear_targets = Some(ClearKey::of(fields)),
                    Kind::Problem => {
                        let list = self.by_clear.entry(key.clone()).or_default();
                        if !list.contains(&id) {
                            list.push(id.clone());
                        }
                    }
                    Kind::Information => {}
                }
                // A resolution seen earlier may postdate this problem.
                let row = self.rows.get_mut(&id);
                if let (Some(row), Some(clear)) = (row, self.clears.get(&key)) {
                    if row.state.latest.value.kind == Kind::Problem {
                        fold::generic_clear(&mut row.state, clear);
                    }
                }
            }
            body => fold::action(&mut row.state, body, &version),
        }
        self.account(&id, was_alive);
        changes.rows.insert(id);

        if let Some(key) = clear_targets {
            let newer = self.clears.get(&key).is_none_or(|v| version > *v);
            if newer {
                self.clears.insert(key.clone(), version.clone());
                changes.clears.insert(key.clone());
            }
            let targets = self.by_clear.get(&key).cloned().unwrap_or_default();
            for target in targets {
                let Some(row) = self.rows.get_mut(&target) else {
                    continue;
                };
                if ClearKey::of(&row.state.latest.value) != key {
                    continue;
                }
                let was_alive = fold::is_alive(&row.state);
                fold::generic_clear(&mut row.state, &version);
                self.account(&target, was_alive);
                changes.rows.insert(target);
            }
        }
        Outcome::Applied
    }

    fn account(&mut self, id: &str, was_alive: bool) {
        let alive = self.rows.get(id).is_some_and(|r| fold::is_alive(&r.state));
        match (was_alive, alive) {
            (false, true) => self.alive += 1,
            (true, false) => self.alive = self.alive.saturating_sub(1),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use tandem_protocol::{AlertFields, Severity};

    use super::*;

    fn event(origin: &str, seq: u64, time: i64, body: EventBody) -> Event {
        Event {
            origin: Origin::new(origin, 7),
            seq,
            time,
            body,
        }
    }

    fn problem(id: &str, node: &str, severity: u8, kind: Kind) -> EventBody {
        EventBody::Occurrence(AlertFields {
            identifier: id.into(),
            node: node.into(),
            alert_key: "k".into(),
            summary: format!("{id} {severity}"),
            severity: Severity::new(severity).unwrap(),
            kind,
            ..AlertFields::default()
        })
    }

    fn snapshot(table: &Table) -> BTreeMap<String, Alert> {
        table
            .alerts()
            .map(|mut a| {
                a.serial = 0;
                a.server_serial = 0;
                (a.identifier.clone(), a)
            })
            .collect()
    }

    #[test]
    fn duplicates_are_acknowledged_and_not_applied() {
        let mut t = Table::new("AGG_P");
        let mut ch = Changes::default();
        let e = event("p", 1, 10, problem("a", "n", 4, Kind::Problem));
        assert_eq!(t.apply(&e, None, &mut ch), Outcome::Applied);
        assert_eq!(t.apply(&e, None, &mut ch), Outcome::Duplicate);
        assert_eq!(t.alerts().next().unwrap().tally, 1);
    }

    #[test]
    fn a_resolution_clears_earlier_problems_in_either_order() {
        for resolution_first in [false, true] {
            let mut t = Table::new("AGG_P");
            let mut ch = Changes::default();
            let p = event("p", 1, 10, problem("down", "web1", 5, Kind::Problem));
            let r = event("p", 2, 20, problem("up", "web1", 1, Kind::Resolution));
            let later = event("q", 1, 5, problem("down", "web1", 5, Kind::Problem));
            let order = if resolution_first {
                vec![&r, &p, &later]
            } else {
                vec![&p, &later, &r]
            };
            for e in order {
                t.apply(e, None, &mut ch);
            }
            let alerts = snapshot(&t);
            assert_eq!(
                alerts["down"].severity,
                Severity::CLEAR,
                "{resolution_first}"
            );
            assert_eq!(alerts["down"].tally, 2);
            assert_eq!(alerts["up"].severity, Severity::CLEAR);
        }
    }

    #[test]
    fn a_newer_problem_survives_an_older_resolution() {
        let mut t = Table::new("AGG_P");
        let mut ch = Changes::default();
        t.apply(
            &event("p", 2, 30, problem("down", "web1", 5, Kind::Problem)),
            None,
            &mut ch,
        );
        t.apply(
            &event("p", 1, 20, problem("up", "web1", 1, Kind::Resolution)),
            None,
            &mut ch,
        );
        assert_eq!(snapshot(&t)["down"].severity, Severity::CRITICAL);
    }

    #[test]
    fn operator_delete_sees_current_counts() {
        let mut t = Table::new("AGG_P");
        let mut ch = Changes::default();
        t.apply(
            &event("p", 1, 10, problem("a", "n", 4, Kind::Problem)),
            None,
            &mut ch,
        );
        let mut del = event(
            "op",
            1,
            11,
            EventBody::Delete {
                identifier: "a".into(),
                seen: None,
            },
        );
        t.resolve_delete(&mut del);
        t.apply(&del, None, &mut ch);
        assert_eq!(t.alive(), 0);
        t.apply(
            &event("p", 2, 12, problem("a", "n", 4, Kind::Problem)),
            None,
            &mut ch,
        );
        assert_eq!(t.alive(), 1);
        assert_eq!(snapshot(&t)["a"].tally, 1);
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        let ids = prop::sample::select(vec!["a", "b", "c", "d"]);
        // As real probe rules do, the identifier fixes node and kind: a and b are problems of
        // n1 and n2, c resolves n1, d is information on n2.
        let occurrence_ids = prop::sample::select(vec![
            ("a", "n1", Kind::Problem),
            ("b", "n2", Kind::Problem),
            ("c", "n1", Kind::Resolution),
            ("d", "n2", Kind::Information),
        ]);
        let origins = prop::sample::select(vec!["p1", "p2", "op"]);
        let body = prop_oneof![
            6 => (occurrence_ids, 0u8..=5)
                .prop_map(|((id, node, kind), sev)| problem(id, node, sev, kind)),
            1 => (ids.clone(), any::<bool>()).prop_map(|(id, ack)| EventBody::Acknowledge { identifier: id.into(), acknowledged: ack, user: "u".into() }),
            1 => (ids.clone(), "[a-c]{1,2}").prop_map(|(id, owner)| EventBody::SetOwner { identifier: id.into(), owner }),
            1 => (ids.clone(), 0u8..=5).prop_map(|(id, s)| EventBody::SetSeverity { identifier: id.into(), severity: Severity::new(s).unwrap() }),
            1 => (ids.clone(), "[x-z]{1,3}").prop_map(|(id, text)| EventBody::Journal { identifier: id.into(), user: "u".into(), text }),
            1 => ids.clone().prop_map(|id| EventBody::Expire { identifier: id.into() }),
            1 => (ids, 0u64..4, 0u64..4).prop_map(|(id, c1, c2)| EventBody::Delete {
                identifier: id.into(),
                seen: Some(vec![
                    OriginCount { origin: Origin::new("p1", 7), count: c1 },
                    OriginCount { origin: Origin::new("p2", 7), count: c2 },
                ]),
            }),
        ];
        (origins, 0i64..40, body).prop_map(|(origin, time, body)| event(origin, 0, time, body))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// G3: the same events, in two orders and with duplicates, give identical tables.
        #[test]
        fn order_and_duplicates_do_not_change_the_result(
            raw in prop::collection::vec(arb_event(), 1..60),
            shuffle in any::<prop::sample::Index>(),
            dups in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            // Number each origin's events 1, 2, 3, ... like a real writer.
            let mut next: HashMap<Origin, u64> = HashMap::new();
            let events: Vec<Event> = raw.into_iter().map(|mut e| {
                let seq = next.entry(e.origin.clone()).or_insert(0);
                *seq += 1;
                e.seq = *seq;
                e
            }).collect();

            let mut a = Table::new("AGG_P");
            let mut ch = Changes::default();
            for e in &events {
                a.apply(e, None, &mut ch);
            }

            let mut reordered: Vec<&Event> = events.iter().collect();
            // A deterministic permutation chosen by proptest (rotate, then reverse halves).
            let k = shuffle.index(reordered.len());
            reordered.rotate_left(k);
            let mid = reordered.len() / 2;
            reordered[..mid].reverse();
            for d in &dups {
                let pick = events.get(d.index(events.len())).unwrap();
                let at = d.index(reordered.len() + 1);
                reordered.insert(at, pick);
            }
            let mut b = Table::new("AGG_P");
            for e in reordered {
                b.apply(e, None, &mut ch);
            }
            prop_assert_eq!(snapshot(&a), snapshot(&b));
            prop_assert_eq!(a.alive(), b.alive());
        }
    }
}
