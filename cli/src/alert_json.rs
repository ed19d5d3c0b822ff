//! Alerts as JSON lines: the input format of `tandem send` and `tandem probe json`.
//!
//! One object a line with the alert model's field names. `identifier` is required; the rest
//! default to empty, problem, indeterminate. `last_occurrence` (ms since the epoch) sets the
//! event time (default: now). Keys the model does not have are kept in `extra`, so nothing a
//! source sends is lost.

use std::collections::BTreeMap;

use serde_json::Value;
use tandem_protocol::{AlertFields, Kind, Severity};

/// A line that is not an alert, with what is wrong.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadAlert(pub String);

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Parses one line; returns the alert and its event time, if it gave one.
pub fn parse(line: &str) -> Result<(AlertFields, Option<i64>), BadAlert> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| BadAlert(format!("not JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(BadAlert(
            "not a JSON object: write one alert object a line".into(),
        ));
    };
    let mut take = |key: &str| map.remove(key);
    let identifier = match take("identifier") {
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        Some(Value::String(_)) | None => {
            return Err(BadAlert(
                "\"identifier\" is missing or empty; every alert needs one".into(),
            ));
        }
        Some(other) => {
            return Err(BadAlert(format!(
                "\"identifier\" must be a string, not {other}"
            )));
        }
    };
    let severity = match take("severity") {
        None => Severity::INDETERMINATE,
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|v| u8::try_from(v).ok())
            .and_then(|v| Severity::new(v).ok())
            .ok_or_else(|| {
                BadAlert(format!(
                    "\"severity\" {n} is out of range: use 0 (clear) to 5 (critical)"
                ))
            })?,
        Some(other) => {
            return Err(BadAlert(format!(
                "\"severity\" must be a number 0 to 5, not {other}"
            )));
        }
    };
    let kind = match take("kind") {
        None => Kind::Problem,
        Some(Value::String(s)) => match s.as_str() {
            "problem" => Kind::Problem,
            "resolution" => Kind::Resolution,
            "information" => Kind::Information,
            _ => {
                return Err(BadAlert(format!(
                    "\"kind\" {s:?} is unknown: use problem, resolution or information"
                )));
            }
        },
        Some(other) => return Err(BadAlert(format!("\"kind\" must be a string, not {other}"))),
    };
    let expire_seconds = match take("expire_seconds") {
        None => 0,
        Some(Value::Number(n)) => {
            n.as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| {
                    BadAlert(format!(
                        "\"expire_seconds\" {n} must be a whole number of seconds"
                    ))
                })?
        }
        Some(other) => {
            return Err(BadAlert(format!(
                "\"expire_seconds\" must be a number, not {other}"
            )));
        }
    };
    let time = match take("last_occurrence") {
        None => None,
        Some(Value::Number(n)) => Some(n.as_i64().filter(|t| *t >= 0).ok_or_else(|| {
            BadAlert(format!(
                "\"last_occurrence\" {n} must be milliseconds since 1970"
            ))
        })?),
        Some(other) => {
            return Err(BadAlert(format!(
                "\"last_occurrence\" must be a number, not {other}"
            )));
        }
    };
    let mut extra = BTreeMap::new();
    if let Some(value) = take("extra") {
        let Value::Object(fields) = value else {
            return Err(BadAlert("\"extra\" must be an object of strings".into()));
        };
        extra.extend(fields.iter().map(|(k, v)| (k.clone(), text(v))));
    }
    let mut field = |key: &str| take(key).map(|v| text(&v)).unwrap_or_default();
    let mut fields = AlertFields {
        identifier,
        node: field("node"),
        node_alias: field("node_alias"),
        manager: field("manager"),
        agent: field("agent"),
        alert_group: field("alert_group"),
        alert_key: field("alert_key"),
        summary: field("summary"),
        class: field("class"),
        kind,
        severity,
        expire_seconds,
        extra,
    };
    for (key, value) in map {
        fields.extra.entry(key).or_insert_with(|| text(&value));
    }
    Ok((fields, time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_line_parses() {
        let (f, t) = parse(r#"{"identifier":"a","node":"web1","severity":5,"kind":"resolution","extra":{"dc":"fra","n":3},"last_occurrence":42}"#).unwrap();
        assert_eq!(f.identifier, "a");
        assert_eq!(f.node, "web1");
        assert_eq!(f.severity, Severity::CRITICAL);
        assert_eq!(f.kind, Kind::Resolution);
        assert_eq!(f.extra["dc"], "fra");
        assert_eq!(f.extra["n"], "3");
        assert_eq!(t, Some(42));
        let (f, _) = parse(r#"{"identifier":"b","region":"eu"}"#).unwrap();
        assert_eq!(f.extra["region"], "eu", "unknown keys are kept in extra");
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let err = |l: &str| parse(l).unwrap_err().0;
        assert!(err("{").contains("not JSON"));
        assert!(err("[1]").contains("not a JSON object"));
        assert!(err(r#"{"node":"x"}"#).contains("\"identifier\" is missing"));
        assert!(err(r#"{"identifier":"a","severity":9}"#).contains("out of range"));
        assert!(err(r#"{"identifier":"a","kind":"bad"}"#).contains("unknown"));
    }
}
