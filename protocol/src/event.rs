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
#[derive(Clone, Default)]
pub struct Origin(
    /// One pointer, so that a [`Version`] is three words: a stored alert carries five of them.
    /// `None` is the empty origin (no name, epoch 0), which a default state's versions hold and
    /// which then costs no allocation.
    Option<Arc<OriginKey>>,
);

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct OriginKey {
    name: Box<str>,
    epoch: u64,
}

impl Origin {
    pub fn new(name: impl AsRef<str>, epoch: u64) -> Self {
        let name = name.as_ref();
        if name.is_empty() && epoch == 0 {
            return Origin(None);
        }
        Origin(Some(Arc::new(OriginKey {
            name: name.into(),
            epoch,
        })))
    }

    pub fn name(&self) -> &str {
        self.0.as_ref().map_or("", |key| &key.name)
    }

    pub fn epoch(&self) -> u64 {
        self.0.as_ref().map_or(0, |key| key.epoch)
    }

    /// One allocation behind both (or both empty): equal without comparing a byte.
    pub fn is_same(&self, other: &Origin) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

/// By name and epoch, one shared origin found without comparing its bytes: a store points every
/// version at one copy of each origin, and folding compares them for every event.
impl PartialEq for Origin {
    fn eq(&self, other: &Origin) -> bool {
        self.is_same(other) || (self.epoch() == other.epoch() && self.name() == other.name())
    }
}

impl Eq for Origin {}

/// The name, then the epoch: the order the versions of every store agree on.
impl Ord for Origin {
    fn cmp(&self, other: &Origin) -> std::cmp::Ordering {
        if self.is_same(other) {
            return std::cmp::Ordering::Equal;
        }
        (self.name(), self.epoch()).cmp(&(other.name(), other.epoch()))
    }
}

impl PartialOrd for Origin {
    fn partial_cmp(&self, other: &Origin) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// As a struct of a name and an epoch would hash.
impl std::hash::Hash for Origin {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name().hash(state);
        self.epoch().hash(state);
    }
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origin")
            .field("name", &self.name())
            .field("epoch", &self.epoch())
            .finish()
    }
}

/// The encoding of a struct `Origin { name: String, epoch: u64 }`: the wire and disk format.
impl Serialize for Origin {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut wire = serializer.serialize_struct("Origin", 2)?;
        wire.serialize_field("name", self.name())?;
        wire.serialize_field("epoch", &self.epoch())?;
        wire.end()
    }
}

#[cfg(test)]
impl proptest::arbitrary::Arbitrary for Origin {
    type Parameters = ();
    type Strategy = proptest::strategy::BoxedStrategy<Origin>;

    fn arbitrary_with(_: ()) -> Self::Strategy {
        ("[a-z0-9_-]{0,12}", proptest::prelude::any::<u64>())
            .prop_map(|(name, epoch)| Origin::new(name, epoch))
            .boxed()
    }
}

/// The same bytes as the derived implementation would read, but the origin is borrowed from
/// the input and shared through [`shared_origin`]: every event and every stored version carries
/// an origin, and a batch or a snapshot page names the same few writers over and over. Decoding
/// each into an allocation of its own cost two allocations (serde builds a `Box<str>`, then the
/// `Arc`) and a free on whichever thread dropped the event.
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
        Ok(shared_origin(&wire.name, wire.epoch))
    }
}

/// As the serde implementation above, through bincode's own traits (see
/// [`crate::codec::decode_prefix_native`]).
impl<'de, C> bincode::BorrowDecode<'de, C> for Origin {
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = C>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        // As bytes: a name equal to one this thread decoded before needs no UTF-8 check.
        let name: &'de [u8] = bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?;
        let epoch = bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?;
        shared_origin_bytes(name, epoch)
            .map_err(|inner| bincode::error::DecodeError::Utf8 { inner })
    }
}

/// Names longer than this are not kept for sharing: a cache slot must not pin a large string.
const SHARED_NAME_MAX: usize = 128;

/// How many recent names, and origins, each thread keeps.
const SHARED_SLOTS: usize = 8;

/// A thread's last few shared values of one kind, handed out again instead of allocated anew.
struct Recent<T> {
    slots: [Option<T>; SHARED_SLOTS],
    next: usize,
    /// The slot that matched last: a batch names one origin in every event, so it is tried
    /// first (names of one length differing only at their end cost a compare each otherwise).
    last: usize,
}

impl<T> Default for Recent<T> {
    fn default() -> Self {
        Recent {
            slots: std::array::from_fn(|_| None),
            next: 0,
            last: 0,
        }
    }
}

impl<T: Clone> Recent<T> {
    /// The kept value that `is` picks, if any.
    fn find(&mut self, is: impl Fn(&T) -> bool) -> Option<T> {
        let matches = |at: usize| self.slots.get(at).and_then(Option::as_ref).is_some_and(&is);
        let found = if matches(self.last) {
            Some(self.last)
        } else {
            (0..SHARED_SLOTS).find(|&at| matches(at))
        }?;
        self.last = found;
        self.slots.get(found).and_then(Option::clone)
    }

    /// The kept value that `is` picks, or `make`'s, kept in place of the oldest.
    fn share(&mut self, is: impl Fn(&T) -> bool, make: impl FnOnce() -> T) -> T {
        if let Some(hit) = self.find(&is) {
            return hit;
        }
        let fresh = make();
        let slot = self.next;
        self.last = slot;
        if let Some(kept) = self.slots.get_mut(slot) {
            *kept = Some(fresh.clone());
        }
        self.next = (slot + 1) % SHARED_SLOTS;
        fresh
    }
}

thread_local! {
    static RECENT_NAMES: RefCell<Recent<Arc<str>>> = RefCell::default();
    static RECENT_ORIGINS: RefCell<Recent<Origin>> = RefCell::default();
}

/// A store name, decoded through [`shared_name`].
pub(crate) fn deserialize_shared_name<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Arc<str>, D::Error> {
    let name: Cow<'de, str> = crate::codec::borrow_cow_str(deserializer)?;
    Ok(shared_name(&name))
}

/// `name` as an `Arc<str>`, shared with the last names this thread asked for: every row and
/// every replicated entry names one of the pair's two stores.
pub fn shared_name(name: &str) -> Arc<str> {
    if name.len() > SHARED_NAME_MAX {
        return Arc::from(name);
    }
    RECENT_NAMES.with_borrow_mut(|recent| recent.share(|kept| &**kept == name, || Arc::from(name)))
}

/// [`shared_origin`] for a name read as bytes: one equal to a kept origin's is valid UTF-8 as
/// that one's is, so only a name not kept is checked. Nearly every event of a batch names an
/// origin the one before it did, and checking its short name was a call and a loop set up each
/// time (with the log entry's source, 4 % of a backup's samples).
pub(crate) fn shared_origin_bytes(name: &[u8], epoch: u64) -> Result<Origin, std::str::Utf8Error> {
    if name.len() <= SHARED_NAME_MAX {
        let kept = RECENT_ORIGINS.with_borrow_mut(|recent| {
            recent.find(|kept| kept.epoch() == epoch && kept.name().as_bytes() == name)
        });
        if let Some(kept) = kept {
            return Ok(kept);
        }
    }
    Ok(shared_origin(std::str::from_utf8(name)?, epoch))
}

/// The origin `name` and `epoch` name, shared with the last origins decoded on this thread
/// that were the same.
pub(crate) fn shared_origin(name: &str, epoch: u64) -> Origin {
    if name.len() > SHARED_NAME_MAX || (name.is_empty() && epoch == 0) {
        return Origin::new(name, epoch);
    }
    RECENT_ORIGINS.with_borrow_mut(|recent| {
        recent.share(
            |kept| kept.epoch() == epoch && kept.name() == name,
            || Origin::new(name, epoch),
        )
    })
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{:x}", self.name(), self.epoch())
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

    /// Where the identifier is in memory, found without reading it ([`Event::identifier`]
    /// checks the text where it ends): for a caller that prefetches it.
    pub fn identifier_address(&self) -> *const u8 {
        match &self.body {
            EventBody::Occurrence(fields) => fields.text_address(),
            // A whole string of its own: taking it reads nothing.
            _ => self.identifier().as_ptr(),
        }
    }

    /// The alert this event is about.
    pub fn identifier(&self) -> &str {
        self.body.identifier()
    }
}

impl EventBody {
    /// The alert this change is about.
    pub fn identifier(&self) -> &str {
        match self {
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

    proptest::proptest! {
        #[test]
        fn an_events_identifier_is_where_its_address_says(event in proptest::prelude::any::<Event>()) {
            proptest::prop_assert_eq!(event.identifier_address(), event.identifier().as_ptr());
        }
    }

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
        assert_ne!(a, Origin::new(a.name(), 2));
        assert_eq!(Origin::new("", 0), Origin::default());
        assert_ne!(Origin::new("", 1), Origin::default());
        assert!(Origin::default() < Origin::new("", 1));
        assert!(Origin::new("", 1) < Origin::new("a", 0));
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
        assert!(a.is_same(&b), "one origin for both");
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
            assert_eq!(again.name(), name);
            let earlier = first.iter().find(|o| o.name() == name).unwrap();
            assert!(again.is_same(earlier), "{name} shared");
        }
        let json: Origin = serde_json::from_str(r#"{"name":"p\u00e9","epoch":2}"#).unwrap();
        assert_eq!(json, Origin::new("p\u{e9}", 2));
    }
}
