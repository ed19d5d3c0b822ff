//! The alert model: what a store holds and what operators see.
//!
//! An alert is keyed by its `identifier`. Field names are part of the operator contract: they are
//! the JSON keys of `tandem alerts --json` and the names the filter language knows, so they are
//! snake_case and never renamed.

use std::borrow::Cow;
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

/// Checked as serde's `try_from` checks it.
impl<'de, C> bincode::BorrowDecode<'de, C> for Severity {
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = C>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        let value = <u8 as bincode::BorrowDecode<'de, C>>::borrow_decode(decoder)?;
        Severity::new(value).map_err(|e| bincode::error::DecodeError::OtherString(e.to_string()))
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
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, bincode::BorrowDecode,
)]
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

/// An occurrence's fields as events and rows carry them: the nine text fields in one allocation.
///
/// [`AlertFields`] is the form to build and read in full; this is the form a store decodes
/// about a million of a second and keeps one of per alert. Nine `String`s cost a store nine
/// allocations to decode an occurrence, nine frees when a newer one displaces it, and 216
/// bytes of headers per row; here it is one of each and a few words. The encoding is
/// [`AlertFields`]' own, field for field, so the two are interchangeable on the wire and on
/// disk.
/// The text fields' names, in [`AlertFields`]' order.
const TEXT_NAMES: [&str; 9] = [
    "identifier",
    "node",
    "node_alias",
    "manager",
    "agent",
    "alert_group",
    "alert_key",
    "summary",
    "class",
];

#[derive(Clone, Default, PartialEq, Eq)]
pub struct PackedFields {
    /// The text fields back to back, in [`AlertFields`]' order.
    text: Box<str>,
    /// Where each text field but the last ends in `text` (the last ends at its end). `u32`,
    /// not `usize`: a frame is at most 64 MiB, and 32 bytes less keeps an `Event` within the
    /// size the compiler moves inline rather than through `memcpy` (every decoded event is
    /// moved several times on its way into a batch).
    ends: [u32; 8],
    pub kind: Kind,
    pub severity: Severity,
    /// Seconds after the last occurrence at which the alert is cleared; 0 never expires.
    pub expire_seconds: u32,
    /// Boxed, and `None` when empty, as it nearly always is: 8 bytes in every row instead of a
    /// map's 24 (see [`PackedFields::extra`]).
    #[allow(clippy::box_collection)] // the point: one pointer in the row, not a map's three
    extra: Option<Box<BTreeMap<String, String>>>,
}

/// The extra fields of an alert that has none.
static NO_EXTRA: BTreeMap<String, String> = BTreeMap::new();

/// An alert's extra fields as a packed alert keeps them: no allocation when there are none.
#[allow(clippy::box_collection)] // see `PackedFields::extra`
fn boxed_extra(extra: BTreeMap<String, String>) -> Option<Box<BTreeMap<String, String>>> {
    (!extra.is_empty()).then(|| Box::new(extra))
}

/// Where each of nine texts of these lengths, laid back to back, ends (the last ends at the
/// end).
fn ends_of(lens: [usize; 9]) -> [u32; 8] {
    let mut end = 0usize;
    std::array::from_fn(|i| {
        end = end.saturating_add(lens.get(i).copied().unwrap_or(0));
        narrow(end)
    })
}

/// An end as stored. Texts past 4 GiB cannot be sent (a frame is at most 64 MiB); saturating
/// keeps [`PackedFields::part`] in range whatever it is given.
fn narrow(end: usize) -> u32 {
    u32::try_from(end).unwrap_or(u32::MAX)
}

impl PackedFields {
    /// Packs the nine text fields, in [`AlertFields`]' order.
    fn from_texts(
        texts: [&str; 9],
        kind: Kind,
        severity: Severity,
        expire_seconds: u32,
        extra: BTreeMap<String, String>,
    ) -> PackedFields {
        PackedFields {
            text: texts.concat().into_boxed_str(),
            ends: ends_of(texts.map(str::len)),
            kind,
            severity,
            expire_seconds,
            extra: boxed_extra(extra),
        }
    }

    /// Text field `i` in [`AlertFields`]' order.
    fn part(&self, i: usize) -> &str {
        let start = match i {
            0 => 0,
            _ => self
                .ends
                .get(i - 1)
                .map_or(self.text.len(), |&end| end as usize),
        };
        let end = self
            .ends
            .get(i)
            .map_or(self.text.len(), |&end| end as usize);
        // Always in range and on character boundaries: `from_texts` set them.
        self.text.get(start..end).unwrap_or_default()
    }

    /// Where the text starts in memory (the identifier first), found without reading it: for
    /// a caller that prefetches it.
    pub fn text_address(&self) -> *const u8 {
        self.text.as_ptr()
    }

    fn texts(&self) -> [&str; 9] {
        std::array::from_fn(|i| self.part(i))
    }

    /// Fields beyond the standard ones, by name.
    pub fn extra(&self) -> &BTreeMap<String, String> {
        self.extra.as_deref().unwrap_or(&NO_EXTRA)
    }

    pub fn identifier(&self) -> &str {
        self.part(0)
    }
    pub fn node(&self) -> &str {
        self.part(1)
    }
    pub fn node_alias(&self) -> &str {
        self.part(2)
    }
    pub fn manager(&self) -> &str {
        self.part(3)
    }
    pub fn agent(&self) -> &str {
        self.part(4)
    }
    pub fn alert_group(&self) -> &str {
        self.part(5)
    }
    pub fn alert_key(&self) -> &str {
        self.part(6)
    }
    pub fn summary(&self) -> &str {
        self.part(7)
    }
    pub fn class(&self) -> &str {
        self.part(8)
    }

    /// The fields as separate strings.
    pub fn unpack(&self) -> AlertFields {
        let [
            identifier,
            node,
            node_alias,
            manager,
            agent,
            alert_group,
            alert_key,
            summary,
            class,
        ] = self.texts().map(String::from);
        AlertFields {
            identifier,
            node,
            node_alias,
            manager,
            agent,
            alert_group,
            alert_key,
            summary,
            class,
            kind: self.kind,
            severity: self.severity,
            expire_seconds: self.expire_seconds,
            extra: self.extra().clone(),
        }
    }
}

impl From<AlertFields> for PackedFields {
    fn from(f: AlertFields) -> PackedFields {
        PackedFields::from_texts(
            [
                &f.identifier,
                &f.node,
                &f.node_alias,
                &f.manager,
                &f.agent,
                &f.alert_group,
                &f.alert_key,
                &f.summary,
                &f.class,
            ],
            f.kind,
            f.severity,
            f.expire_seconds,
            f.extra,
        )
    }
}

impl AlertFields {
    /// The fields in one allocation, as events and rows carry them.
    pub fn pack(self) -> PackedFields {
        self.into()
    }
}

impl fmt::Debug for PackedFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("PackedFields");
        for (name, text) in TEXT_NAMES.iter().zip(self.texts()) {
            out.field(name, &text);
        }
        out.field("kind", &self.kind)
            .field("severity", &self.severity)
            .field("expire_seconds", &self.expire_seconds)
            .field("extra", self.extra())
            .finish()
    }
}

/// [`AlertFields`]' layout with the text borrowed: what [`PackedFields`] encodes as, and
/// decodes from with the text borrowed from the input where the format allows (the codec's
/// does), so that the texts are copied once, into the packed allocation.
#[derive(Serialize, Deserialize)]
#[serde(rename = "AlertFields")]
struct FieldsWire<'a> {
    #[serde(borrow)]
    identifier: Cow<'a, str>,
    #[serde(borrow)]
    node: Cow<'a, str>,
    #[serde(borrow)]
    node_alias: Cow<'a, str>,
    #[serde(borrow)]
    manager: Cow<'a, str>,
    #[serde(borrow)]
    agent: Cow<'a, str>,
    #[serde(borrow)]
    alert_group: Cow<'a, str>,
    #[serde(borrow)]
    alert_key: Cow<'a, str>,
    #[serde(borrow)]
    summary: Cow<'a, str>,
    #[serde(borrow)]
    class: Cow<'a, str>,
    kind: Kind,
    severity: Severity,
    expire_seconds: u32,
    extra: Cow<'a, BTreeMap<String, String>>,
}

impl Serialize for PackedFields {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let [
            identifier,
            node,
            node_alias,
            manager,
            agent,
            alert_group,
            alert_key,
            summary,
            class,
        ] = self.texts().map(Cow::Borrowed);
        FieldsWire {
            identifier,
            node,
            node_alias,
            manager,
            agent,
            alert_group,
            alert_key,
            summary,
            class,
            kind: self.kind,
            severity: self.severity,
            expire_seconds: self.expire_seconds,
            extra: Cow::Borrowed(self.extra()),
        }
        .serialize(serializer)
    }
}

/// [`FieldsWire`] as a binary format reads it: the texts as bytes, validated as UTF-8 once,
/// together, in the packed allocation. Reading them as `str` checked each of the nine on its
/// own, with a call and a loop set up per field: a tenth of a store's decoding.
#[derive(Deserialize)]
#[serde(rename = "AlertFields")]
struct BinaryWire<'a> {
    #[serde(borrow)]
    identifier: Cow<'a, [u8]>,
    #[serde(borrow)]
    node: Cow<'a, [u8]>,
    #[serde(borrow)]
    node_alias: Cow<'a, [u8]>,
    #[serde(borrow)]
    manager: Cow<'a, [u8]>,
    #[serde(borrow)]
    agent: Cow<'a, [u8]>,
    #[serde(borrow)]
    alert_group: Cow<'a, [u8]>,
    #[serde(borrow)]
    alert_key: Cow<'a, [u8]>,
    #[serde(borrow)]
    summary: Cow<'a, [u8]>,
    #[serde(borrow)]
    class: Cow<'a, [u8]>,
    kind: Kind,
    severity: Severity,
    expire_seconds: u32,
    extra: BTreeMap<String, String>,
}

impl BinaryWire<'_> {
    fn pack(self) -> Result<PackedFields, String> {
        let texts: [&[u8]; 9] = [
            &self.identifier,
            &self.node,
            &self.node_alias,
            &self.manager,
            &self.agent,
            &self.alert_group,
            &self.alert_key,
            &self.summary,
            &self.class,
        ];
        pack_binary(
            texts,
            self.kind,
            self.severity,
            self.expire_seconds,
            self.extra,
        )
    }
}

/// The same bytes as [`BinaryWire`], read without serde: events and alert states are decoded
/// through bincode's own traits on the paths that decode millions of them (see
/// [`crate::codec::decode_prefix_native`]).
impl<'de, C> bincode::BorrowDecode<'de, C> for PackedFields {
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = C>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        let mut texts: [&'de [u8]; 9] = [&[]; 9];
        for text in &mut texts {
            *text = bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?;
        }
        let kind = bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?;
        let severity = bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?;
        let expire_seconds = bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?;
        let extra = bincode::BorrowDecode::<'de, C>::borrow_decode(decoder)?;
        pack_binary(texts, kind, severity, expire_seconds, extra)
            .map_err(bincode::error::DecodeError::OtherString)
    }
}

/// Packs texts read as bytes: checked as UTF-8 once, together, in the packed allocation.
fn pack_binary(
    texts: [&[u8]; 9],
    kind: Kind,
    severity: Severity,
    expire_seconds: u32,
    extra: BTreeMap<String, String>,
) -> Result<PackedFields, String> {
    // One pass for the bytes and the ends, as `from_texts` is not: on this path, every
    // decoded occurrence, `concat` and `ends_of` measured 3 % slower (alternated runs).
    let mut bytes = Vec::with_capacity(texts.iter().map(|t| t.len()).sum());
    let mut ends = [0; 8];
    for (i, part) in texts.iter().enumerate() {
        bytes.extend_from_slice(part);
        if let Some(end) = ends.get_mut(i) {
            *end = narrow(bytes.len());
        }
    }
    // Valid as a whole and split on character boundaries: then each field is valid too.
    let text = String::from_utf8(bytes).map_err(|e| {
        format!(
            "an alert's text fields are not valid UTF-8: {}",
            e.utf8_error()
        )
    })?;
    if let Some(i) = ends
        .iter()
        .position(|&end| !text.is_char_boundary(end as usize))
    {
        return Err(format!(
            "the alert field {} is not valid UTF-8: it ends inside a character",
            TEXT_NAMES[i]
        ));
    }
    Ok(PackedFields {
        text: text.into_boxed_str(),
        ends,
        kind,
        severity,
        expire_seconds,
        extra: boxed_extra(extra),
    })
}

impl<'de> Deserialize<'de> for PackedFields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if !deserializer.is_human_readable() {
            return BinaryWire::deserialize(deserializer)?
                .pack()
                .map_err(serde::de::Error::custom);
        }
        let w = FieldsWire::deserialize(deserializer)?;
        Ok(PackedFields::from_texts(
            [
                &w.identifier,
                &w.node,
                &w.node_alias,
                &w.manager,
                &w.agent,
                &w.alert_group,
                &w.alert_key,
                &w.summary,
                &w.class,
            ],
            w.kind,
            w.severity,
            w.expire_seconds,
            w.extra.into_owned(),
        ))
    }
}

#[cfg(test)]
impl proptest::arbitrary::Arbitrary for PackedFields {
    type Parameters = ();
    type Strategy = proptest::strategy::BoxedStrategy<Self>;

    fn arbitrary_with(_: ()) -> Self::Strategy {
        use proptest::prelude::*;
        any::<AlertFields>().prop_map(PackedFields::from).boxed()
    }
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

    #[test]
    fn packed_fields_keep_every_field_and_the_same_encoding() {
        use proptest::prelude::*;
        proptest!(|(fields in any::<AlertFields>())| {
            let packed = fields.clone().pack();
            prop_assert_eq!(packed.unpack(), fields.clone());
            prop_assert_eq!(packed.identifier(), fields.identifier.as_str());
            prop_assert_eq!(packed.class(), fields.class.as_str());
            let bytes = crate::codec::to_bytes(&fields).unwrap();
            prop_assert_eq!(crate::codec::to_bytes(&packed).unwrap(), bytes.clone());
            let decoded: PackedFields = crate::codec::from_bytes(&bytes).unwrap();
            prop_assert_eq!(&decoded, &packed);
            let json = serde_json::to_string(&packed).unwrap();
            prop_assert_eq!(&json, &serde_json::to_string(&fields).unwrap());
            prop_assert_eq!(serde_json::from_str::<PackedFields>(&json).unwrap(), packed);
        });
    }

    #[test]
    fn packed_fields_refuse_text_that_is_not_utf8_even_split_across_two_fields() {
        // `é` is 0xC3 0xA9: one field ending in its first byte and the next starting with its
        // second are two invalid fields, though their texts together are valid.
        let encoded = |node: &[u8], node_alias: &[u8]| {
            let fields = AlertFields {
                identifier: "web1:ping".into(),
                node: "XX".into(),
                node_alias: "YY".into(),
                ..AlertFields::default()
            };
            let mut bytes = crate::codec::to_bytes(&fields).unwrap();
            let at = bytes.windows(2).position(|w| w == b"XX").unwrap();
            bytes[at..at + 2].copy_from_slice(node);
            let at = bytes.windows(2).position(|w| w == b"YY").unwrap();
            bytes[at..at + 2].copy_from_slice(node_alias);
            bytes
        };
        let split = encoded(b"a\xC3", b"\xA9b");
        let err = crate::codec::from_bytes::<PackedFields>(&split).unwrap_err();
        assert!(err.to_string().contains("node"), "{err}");
        assert!(crate::codec::from_bytes::<AlertFields>(&split).is_err());
        let bad = encoded(b"a\xFF", b"bc");
        let err = crate::codec::from_bytes::<PackedFields>(&bad).unwrap_err();
        assert!(err.to_string().contains("not valid UTF-8"), "{err}");
        let good = encoded("\u{e9}".as_bytes(), b"bc");
        let packed = crate::codec::from_bytes::<PackedFields>(&good).unwrap();
        assert_eq!((packed.node(), packed.node_alias()), ("\u{e9}", "bc"));
    }

    #[test]
    fn packed_fields_tell_apart_where_one_field_ends() {
        let a = AlertFields {
            node: "ab".into(),
            manager: "c".into(),
            ..AlertFields::default()
        };
        let b = AlertFields {
            node: "a".into(),
            manager: "bc".into(),
            ..AlertFields::default()
        };
        assert_ne!(a.clone().pack(), b.clone().pack());
        assert_eq!(a.pack().node(), "ab");
        assert_eq!(b.pack().manager(), "bc");
    }
}
