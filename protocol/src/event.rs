//! Events: the only way an alert changes.
//!
//! Every change, whether a probe's occurrence, an operator's action or a store's housekeeping, is
//! an [`Event`] named by `(origin, seq)`. Stores apply each name at most once (exactly-once, G2)
//! and order competing writes by [`Version`] so that every store reaches the same table whatever
//! order it sees the events in (G3).

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};

use crate::alert::{Millis, PackedFields, Severity};

/// The writer of an event: a probe instance, an operator command or a store's housekeeping.
///
/// `epoch` is chosen when the writer's sequence space is created (a probe's spool, a store's data
/// directory), so a writer that loses its spool starts a new origin instead of reusing numbers.
#[derive(Clone, Debug, Default, Eq, PartialOrd, Ord, Serialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Origin {
    /// Shared: every event and version of one writer points at the same name.
    #[cfg_attr(test, proptest(strategy = "\"[a-z0-9_-]{0,12}\".prop_map(Arc::from)"))]
    pub name: Arc<str>,
    pub epoch: u64,
}

/// The derived comparison's result, the epochs first and one shared name found without
/// comparing its bytes: a store points every version at one copy of each origin, and folding
/// compares them for every event (`Arc<str>` compares the bytes even when both are one).
impl PartialEq for Origin {
    fn eq(&self, other: &Origin) -> bool {
        self.epoch == other.epoch
            && (Arc::ptr_eq(&self.name, &other.name) || self.name == other.name)
    }
}

/// As derived: the name, then the epoch (equal origins hash alike either way).
impl std::hash::Hash for Origin {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.epoch.hash(state);
    }
}

impl Origin {
    pub fn new(name: impl Into<Arc<str>>, epoch: u64) -> Self {
        Origin {
            name: name.into(),
            epoch,
        }
    }
}

/// The same bytes as the derived implementation would read, but the name is borrowed from the
/// input and shared through [`shared_name`]: every event and every stored version carries an
/// origin, and a batch or a snapshot page names the same few writers over and over. Decoding
/// each name into its own `Arc<str>` cost two allocations (serde builds a `Box<str>`, then the
/// `Arc` copies it) and a free on whichever thread dropped the event.
impl<'de> Deserialize<'de> for Origin {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename = "Origin")]
        struct Wire<'a> {
            #[serde(borrow)]
            name: Cow<'a, str>,
            epoch: u64,
        }
        let wire = Wire::deserialize(deserializer)?;
        Ok(Origin {
            name: shared_name(&wire.name),
            epoch: wire.epoch,
        })
    }
}

/// As the serde implementation above, through bincode's own traits (see
/// [`crate::codec::decode_prefix_native`]).
impl<'de, C> bincode::BorrowDecode<'de, C> for Origin {
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = C>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        let name: &'de str = bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?;
        let epoch = bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?;
        Ok(Origin {
            name: shared_name(name),
            epoch,
        })
    }
}

/// Names longer than this are not kept for sharing: a cache slot must not pin a large string.
const SHARED_NAME_MAX: usize = 128;

/// How many recent names each thread keeps.
const SHARED_NAME_SLOTS: usize = 8;

#[derive(Default)]
struct RecentNames {
    slots: [Option<Arc<str>>; SHARED_NAME_SLOTS],
    next: usize,
    /// The slot that matched last: a batch names one origin in every event, so it is tried
    /// first (names of one length differing only at their end cost a compare each otherwise).
    last: usize,
}

thread_local! {
    static RECENT_NAMES: RefCell<RecentNames> = RefCell::default();
}

/// A store or origin name, decoded through [`shared_name`].
pub(crate) fn deserialize_shared_name<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Arc<str>, D::Error> {
    let name: Cow<'de, str> = crate::codec::borrow_cow_str(deserializer)?;
    Ok(shared_name(&name))
}

/// `name` as an `Arc<str>`, shared with the last origins decoded on this thread that had it.
pub(crate) fn shared_name(name: &str) -> Arc<str> {
    if name.len() > SHARED_NAME_MAX {
        return Arc::from(name);
    }
    RECENT_NAMES.with_borrow_mut(|recent| {
        let is = |at: usize| recent.slots.get(at).and_then(Option::as_deref) == Some(name);
        let found = if is(recent.last) {
            Some(recent.last)
        } else {
            (0..SHARED_NAME_SLOTS).find(|&at| is(at))
        };
        if let Some(at) = found {
            recent.last = at;
            if let Some(Some(hit)) = recent.slots.get(at) {
                return hit.clone();
            }
        }
        let fresh: Arc<str> = Arc::from(name);
        let slot = recent.next;
        recent.last = slot;
        recent.slots[slot] = Some(fresh.clone());
        recent.next = (slot + 1) % SHARED_NAME_SLOTS;
        fresh
    })
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{:x}", self.name, self.epoch)
    }
}

/// The total order that decides which of two writes to a field wins: later event time first,
/// then origin, then sequence number. No two distinct events share a version.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    bincode::BorrowDecode,
)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Version {
    pub time: Millis,
    pub origin: Origin,
    pub seq: u64,
}

/// How many occurrences of an alert one origin had contributed when a delete was issued.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    bincode::BorrowDecode,
)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct OriginCount {
    pub origin: Origin,
    pub count: u64,
}

/// One change to the alert table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, bincode::BorrowDecode)]
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
            EventBody::Occurrence(fields) => fields.identifier(),
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, bincode::BorrowDecode)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum EventBody {
    /// A probe saw something: inserts the alert or deduplicates into it (tally + 1). A
    /// resolution also clears the earlier problems with the same node, alert key, alert group
    /// and manager.
    Occurrence(PackedFields),
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

    #[test]
    fn origins_are_equal_by_name_and_epoch_whether_or_not_they_share_the_name() {
        let a = Origin::new("probe-a", 1);
        assert_eq!(a, a.clone());
        assert_eq!(
            a,
            Origin::new("probe-a", 1),
            "the same name in two allocations"
        );
        assert_ne!(a, Origin::new("probe-a", 2));
        assert_ne!(a, Origin::new("probe-b", 1));
        let shared_other_epoch = Origin {
            name: a.name.clone(),
            epoch: 2,
        };
        assert_ne!(a, shared_other_epoch);
    }

    #[test]
    fn decoded_origins_share_their_name_and_keep_the_derived_encoding() {
        #[derive(Serialize)]
        struct Derived<'a> {
            name: &'a str,
            epoch: u64,
        }
        let bytes = crate::codec::to_bytes(&Derived {
            name: "probe-a",
            epoch: 7,
        })
        .unwrap();
        let origin = Origin::new("probe-a", 7);
        assert_eq!(crate::codec::to_bytes(&origin).unwrap(), bytes);
        let a: Origin = crate::codec::from_bytes(&bytes).unwrap();
        let b: Origin = crate::codec::from_bytes(&bytes).unwrap();
        assert_eq!(a, origin);
        assert!(Arc::ptr_eq(&a.name, &b.name), "one name for both");
        // More writers than the cache holds, and a name too long to keep: still decoded right.
        let long = "x".repeat(SHARED_NAME_MAX + 1);
        for name in (0..20)
            .map(|n| format!("p{n}"))
            .chain([long, String::new()])
        {
            let origin = Origin::new(name.as_str(), 3);
            let decoded: Origin =
                crate::codec::from_bytes(&crate::codec::to_bytes(&origin).unwrap()).unwrap();
            assert_eq!(decoded, origin);
        }
        // Names of one length taking turns, as batches from several probes do: each decodes
        // as itself (the slot tried first is the last one that matched) and shares its name.
        let decode = |name: &str| -> Origin {
            crate::codec::from_bytes(&crate::codec::to_bytes(&Origin::new(name, 1)).unwrap())
                .unwrap()
        };
        let first: Vec<Origin> = ["probe-1", "probe-2", "probe-3"].map(decode).into();
        for name in ["probe-2", "probe-2", "probe-1", "probe-3", "probe-1"] {
            let again = decode(name);
            assert_eq!(&*again.name, name);
            let earlier = first.iter().find(|o| &*o.name == name).unwrap();
            assert!(Arc::ptr_eq(&again.name, &earlier.name), "{name} shared");
        }
        let json: Origin = serde_json::from_str(r#"{"name":"p\u00e9","epoch":2}"#).unwrap();
        assert_eq!(json, Origin::new("p\u{e9}", 2));
    }
}
