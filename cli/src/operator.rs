//! Operator commands that talk to one store directly: `alerts`, `ack`, `delete`, `journal`.
//!
//! Actions are events with the operator's own origin (a fresh epoch per command, sequence 1),
//! so they are applied exactly once, logged and replicated like every other change.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tandem_config::PairFile;
use tandem_net::tls::ClientTls;
use tandem_probe::Connection;
use tandem_protocol::{Alert, ClientKind, Event, EventBody, Message, Origin, Query};
use tandem_store::query::{Filter, parse_sort};

use crate::UsageError;

const TIMEOUT: Duration = Duration::from_secs(10);

async fn connect(
    pair: &PairFile,
    tls: Option<&ClientTls>,
    name: Option<&str>,
) -> Result<(Connection, String)> {
    let store = pair.select_store(name)?;
    let user = user();
    let conn = Connection::connect_tls(
        store.listen.0,
        ClientKind::Operator,
        &format!("operator/{user}"),
        pair.pair.max_frame_bytes,
        TIMEOUT,
        tls,
    )
    .await
    .with_context(|| format!("store {} at {}", store.name, store.listen))?;
    Ok((conn, store.name.clone()))
}

fn user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "operator".to_string())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Checks a filter and sort here, so a typo is a usage error with a caret, not a round trip.
pub fn build_query(filter: Option<&str>, sort: Option<&str>, limit: Option<u32>) -> Result<Query> {
    let filter = filter.unwrap_or("").to_string();
    Filter::parse(&filter).map_err(|e| {
        UsageError(format!(
            "--filter, column {}: {}",
            e.column,
            e.render(&filter)
        ))
    })?;
    let sort = match sort {
        Some(spec) => parse_sort(spec)
            .map_err(|e| UsageError(format!("--sort, column {}: {}", e.column, e.render(spec))))?,
        None => Vec::new(),
    };
    Ok(Query {
        filter,
        sort,
        limit,
    })
}

pub async fn query(
    pair: &PairFile,
    tls: Option<&ClientTls>,
    name: Option<&str>,
    query: Query,
) -> Result<(Vec<Alert>, u64)> {
    let (mut conn, store) = connect(pair, tls, name).await?;
    match conn.request(&Message::Query(query), TIMEOUT).await? {
        Message::Alerts { alerts, total } => Ok((alerts, total)),
        Message::Error { message } => bail!("store {store}: {message}"),
        other => bail!("store {store} answered a query with {}", other.name()),
    }
}

pub fn print_alerts(alerts: &[Alert], total: u64, json: bool) -> Result<()> {
    match write_alerts(&mut std::io::stdout().lock(), alerts, total, json) {
        // The reader went away (`tandem alerts | head`): it has what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => Ok(written?),
    }
}

fn write_alerts(
    out: &mut impl std::io::Write,
    alerts: &[Alert],
    total: u64,
    json: bool,
) -> std::io::Result<()> {
    if json {
        for alert in alerts {
            serde_json::to_writer(&mut *out, alert)?;
            writeln!(out)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:>8}  {:<13}  {:>6}  {:<3}  {:<20}  {:<16}  {:<30}  SUMMARY",
        "SERIAL", "SEVERITY", "TALLY", "ACK", "LAST OCCURRENCE", "NODE", "IDENTIFIER"
    )?;
    for a in alerts {
        writeln!(
            out,
            "{:>8}  {:<13}  {:>6}  {:<3}  {:<20}  {:<16}  {:<30}  {}",
            a.serial,
            a.severity.name(),
            a.tally,
            if a.acknowledged { "yes" } else { "no" },
            time(a.last_occurrence),
            clip(&a.node, 16),
            clip(&a.identifier, 30),
            clip(&a.summary, 60),
        )?;
    }
    writeln!(out, "({} shown of {total})", alerts.len())
}

fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn time(ms: i64) -> String {
    let Ok(ms) = u64::try_from(ms) else {
        return ms.to_string();
    };
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Applies one operator action to an existing alert.
pub async fn act(
    pair: &PairFile,
    tls: Option<&ClientTls>,
    name: Option<&str>,
    body: EventBody,
) -> Result<String> {
    let identifier = match &body {
        EventBody::Acknowledge { identifier, .. }
        | EventBody::Delete { identifier, .. }
        | EventBody::Journal { identifier, .. } => identifier.clone(),
        _ => bail!("not an operator action"),
    };
    let (mut conn, store) = connect(pair, tls, name).await?;
    let exists = Query {
        filter: format!("identifier = {}", quote(&identifier)),
        sort: Vec::new(),
        limit: Some(1),
    };
    match conn.request(&Message::Query(exists), TIMEOUT).await? {
        Message::Alerts { total: 0, .. } => {
            bail!(
                "store {store} has no alert {identifier:?} (tandem alerts --name {store} lists them)"
            )
        }
        Message::Alerts { .. } => {}
        Message::Error { message } => bail!("store {store}: {message}"),
        other => bail!("store {store} answered a query with {}", other.name()),
    }
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let event = Event {
        origin: Origin::new(format!("operator/{}", user()), epoch),
        seq: 1,
        time: now_ms(),
        body,
    };
    let batch = Message::Events {
        batch: 1,
        events: vec![event],
    };
    match conn.request(&batch, TIMEOUT).await? {
        Message::Ack { .. } => Ok(store),
        Message::Refused { reason, .. } => bail!("store {store} refused the action: {reason}"),
        Message::Error { message } => bail!("store {store}: {message}"),
        other => bail!("store {store} answered with {}", other.name()),
    }
}

fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\t' => q.push_str("\\t"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

pub fn user_or(given: Option<&String>) -> String {
    given.cloned().unwrap_or_else(user)
}
