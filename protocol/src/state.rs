//! Replicable store state: per-alert fold state and per-origin applied-sequence sets.
//!
//! A store persists each alert as an [`AlertState`] and ships the same records in a full resync
//! snapshot, so what is on disk and what crosses the wire are one format. [`SeqRanges`] is the
//! exactly-once bookkeeping: the set of sequence numbers of one origin that a store has applied,
//! kept as coalesced ranges (usually one per origin).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thin_vec::ThinVec;

use crate::alert::{JournalEntry, Millis, PackedFields, Severity};
use crate::event::{Origin, OriginCount, Version};

/// A value with the version of the write that set it (last-writer-wins by version).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, bincode::BorrowDecode)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Versioned<T> {
    pub value: T,
    pub version: Version,
}

/// Everything a store folds from the events of one alert.
///
/// A store keeps one in memory for every alert, so its size is the table's: the store name is
/// shared (every row names one of two stores), the owner boxed and the lists thin (one pointer,
/// their length and capacity kept with their items), which keeps a row within 320 bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AlertState {
    /// Where the alert was first inserted: the store name and its serial there, from the
    /// occurrence with the lowest version (ties broken by store name).
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::strategy::Strategy::prop_map(proptest::prelude::any::<(String, u64, Version)>(), |(name, serial, version)| Versioned { value: (Arc::from(name), serial), version })"
        )
    )]
    pub inserted: Versioned<(Arc<str>, u64)>,
    /// The newest occurrence's fields.
    pub latest: Versioned<PackedFields>,
    /// Set by occurrences, generic clears, expiry and operators; newest version wins.
    pub severity: Versioned<Severity>,
    pub acknowledged: Versioned<bool>,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::strategy::Strategy::prop_map(proptest::prelude::any::<(String, Version)>(), |(owner, version)| Versioned { value: owner.into_boxed_str(), version })"
        )
    )]
    pub owner: Versioned<Box<str>>,
    pub first_occurrence: Millis,
    pub last_occurrence: Millis,
    pub state_change: Millis,
    /// Occurrence events applied, per origin.
    #[cfg_attr(test, proptest(strategy = "thin::<OriginCount>()"))]
    pub occurrences: ThinVec<OriginCount>,
    /// Occurrences removed by deletes, per origin; the alert exists while any origin has more
    /// occurrences than deletions.
    #[cfg_attr(test, proptest(strategy = "thin::<OriginCount>()"))]
    pub deleted: ThinVec<OriginCount>,
    #[cfg_attr(test, proptest(strategy = "thin::<JournalEntry>()"))]
    pub journal: ThinVec<JournalEntry>,
}

#[cfg(test)]
fn thin<T: proptest::arbitrary::Arbitrary>() -> impl proptest::strategy::Strategy<Value = ThinVec<T>>
{
    proptest::strategy::Strategy::prop_map(proptest::prelude::any::<Vec<T>>(), ThinVec::from)
}

/// A list as bincode writes a `Vec`: its length, then its items.
fn decode_thin<'de, T, C, D>(decoder: &mut D) -> Result<ThinVec<T>, bincode::error::DecodeError>
where
    T: bincode::BorrowDecode<'de, C>,
    D: bincode::de::BorrowDecoder<'de, Context = C>,
{
    let len: u64 = bincode::Decode::decode(decoder)?;
    let len =
        usize::try_from(len).map_err(|_| bincode::error::DecodeError::OutsideUsizeRange(len))?;
    // Bounded by the decoder's limit before anything is reserved, as bincode's own `Vec`
    // decoding does.
    decoder.claim_container_read::<T>(len)?;
    let mut list = ThinVec::with_capacity(len);
    for _ in 0..len {
        decoder.unclaim_bytes_read(std::mem::size_of::<T>());
        list.push(T::borrow_decode(decoder)?);
    }
    Ok(list)
}

/// As derived, field by field, but the store name is shared through
/// [`crate::event::shared_name`] instead of allocated for every row, and the lists read into thin
/// vectors.
impl<'de, C> bincode::BorrowDecode<'de, C> for AlertState {
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = C>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        let name: &'de str = bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?;
        let serial = bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?;
        let inserted = Versioned {
            value: (crate::event::shared_name(name), serial),
            version: bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?,
        };
        Ok(AlertState {
            inserted,
            latest: bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?,
            severity: bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?,
            acknowledged: bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?,
            owner: bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?,
            first_occurrence: bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?,
            last_occurrence: bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?,
            state_change: bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?,
            occurrences: decode_thin(decoder)?,
            deleted: decode_thin(decoder)?,
            journal: decode_thin(decoder)?,
        })
    }
}

/// The applied sequence numbers of one origin, as sorted, disjoint, non-adjacent inclusive
/// ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(u64, u64)>", into = "Vec<(u64, u64)>")]
pub struct SeqRanges {
    ranges: Vec<(u64, u64)>,
}

/// The applied set of one origin, as it crosses the wire in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AppliedRanges {
    pub origin: Origin,
    pub ranges: SeqRanges,
}

impl From<Vec<(u64, u64)>> for SeqRanges {
    fn from(ranges: Vec<(u64, u64)>) -> Self {
        SeqRanges::from_ranges(ranges)
    }
}

impl From<SeqRanges> for Vec<(u64, u64)> {
    fn from(set: SeqRanges) -> Self {
        set.ranges
    }
}

#[cfg(test)]
impl proptest::arbitrary::Arbitrary for SeqRanges {
    type Parameters = ();
    type Strategy = proptest::strategy::BoxedStrategy<Self>;

    fn arbitrary_with(_: ()) -> Self::Strategy {
        use proptest::prelude::*;
        proptest::collection::vec((any::<u64>(), any::<u64>()), 0..4)
            .prop_map(SeqRanges::from_ranges)
            .boxed()
    }
}

impl SeqRanges {
    pub fn new() -> Self {
        SeqRanges::default()
    }

    /// Builds a set from ranges of any shape; overlapping, adjacent, reversed and unsorted
    /// ranges are normalised, so a set decoded from a peer is as good as one built locally.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut set = SeqRanges::new();
        for (a, b) in ranges {
            set.insert_range(a.min(b), a.max(b));
        }
        set
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many sequence numbers the set holds.
    pub fn len(&self) -> u64 {
        self.ranges
            .iter()
            .map(|&(a, b)| (b - a).saturating_add(1))
            .fold(0u64, u64::saturating_add)
    }

    /// The index of the first range whose end is >= `seq`.
    fn position(&self, seq: u64) -> usize {
        self.ranges.partition_point(|&(_, end)| end < seq)
    }

    pub fn contains(&self, seq: u64) -> bool {
        let i = self.position(seq);
        self.ranges.get(i).is_some_and(|&(start, _)| start <= seq)
    }

    /// Adds `seq`; returns false when it was already there (a duplicate).
    pub fn insert(&mut self, seq: u64) -> bool {
        // The common case by far: the next number of the last range.
        if let Some(last) = self.ranges.last_mut() {
            if last.1.checked_add(1) == Some(seq) {
                last.1 = seq;
                return true;
            }
        }
        if self.contains(seq) {
            return false;
        }
        self.insert_range(seq, seq);
        true
    }

    /// Adds every number of `start..=end` (start <= end).
    pub fn insert_range(&mut self, start: u64, end: u64) {
        debug_assert!(start <= end);
        // First range that touches or follows [start, end] (adjacent counts as touching).
        let lo = self
            .ranges
            .partition_point(|&(_, e)| e.saturating_add(1) < start);
        let mut hi = lo;
        let (mut new_start, mut new_end) = (start, end);
        while let Some(&(s, e)) = self.ranges.get(hi) {
            if s > end.saturating_add(1) {
                break;
            }
            new_start = new_start.min(s);
            new_end = new_end.max(e);
            hi += 1;
        }
        self.ranges.splice(lo..hi, [(new_start, new_end)]);
    }

    /// Adds every number of `other`.
    pub fn union(&mut self, other: &SeqRanges) {
        for &(a, b) in &other.ranges {
            self.insert_range(a, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn consecutive_inserts_stay_one_range() {
        let mut set = SeqRanges::new();
        for seq in 1..=1000 {
            assert!(set.insert(seq));
        }
        assert!(!set.insert(500));
        assert_eq!(set.ranges(), &[(1, 1000)]);
        assert_eq!(set.len(), 1000);
    }

    #[test]
    fn a_gap_is_filled_and_coalesced() {
        let mut set = SeqRanges::from_ranges([(1, 10), (20, 30)]);
        assert!(!set.contains(15));
        set.insert_range(11, 19);
        assert_eq!(set.ranges(), &[(1, 30)]);
        let reversed = SeqRanges::from_ranges([(30, 20), (5, 1), (6, 6)]);
        assert_eq!(reversed.ranges(), &[(1, 6), (20, 30)]);
    }

    #[test]
    fn extremes_do_not_overflow() {
        let mut set = SeqRanges::new();
        assert!(set.insert(u64::MAX));
        assert!(set.insert(0));
        assert!(set.insert(u64::MAX - 1));
        assert_eq!(set.ranges(), &[(0, 0), (u64::MAX - 1, u64::MAX)]);
        set.insert_range(0, u64::MAX);
        assert_eq!(set.ranges(), &[(0, u64::MAX)]);
        assert_eq!(set.len(), u64::MAX);
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec((0u64..200, 0u64..8), 0..200)) {
            let mut set = SeqRanges::new();
            let mut model = BTreeSet::new();
            for (start, width) in ops {
                if width == 0 {
                    prop_assert_eq!(set.insert(start), model.insert(start));
                } else {
                    set.insert_range(start, start + width);
                    model.extend(start..=start + width);
                }
            }
            for seq in 0..220 {
                prop_assert_eq!(set.contains(seq), model.contains(&seq));
            }
            prop_assert_eq!(set.len(), model.len() as u64);
            for pair in set.ranges().windows(2) {
                prop_assert!(pair[0].1 + 1 < pair[1].0, "not coalesced: {:?}", set.ranges());
            }
        }
    }
}
