//! `tandem send`: JSON-lines alerts through the virtual pair, waiting for every
//! acknowledgement.
//!
//! With a disk spool (`[probe] spool_dir`), what was read and not acknowledged survives a kill
//! of this command, and so does how far the input was read: run it again on the same file and
//! it resends the unacknowledged events and goes on after the last line it had read, so every
//! line is delivered once. A run that finishes resets that position, so the next run of the same
//! file sends it again.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tandem_config::PairFile;
use tandem_probe::pair::{PairClient, PairError, Stats};
use tandem_protocol::EventBody;

use crate::args::SendArgs;
use crate::{alert_json, probe_config, runtime};

/// Events handed to the client at a time.
const CHUNK: usize = 1_000;

/// Spooled-but-unacknowledged events at most before reading waits: bounds memory for any input.
const MAX_PENDING: u64 = 100_000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn run(pair: &PairFile, data_dir: &Path, args: &SendArgs) -> Result<()> {
    let name = probe_config::instance_name("send", args.file.as_deref());
    let config = probe_config::pair_config(pair, data_dir, &name)?;
    let spool = probe_config::open_spool(pair, data_dir, &name)?;
    let input: Box<dyn BufRead> = match &args.file {
        Some(path) => Box::new(BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?,
        )),
        None => Box::new(BufReader::new(std::io::stdin())),
    };
    let timeout = Duration::from_secs(args.timeout);
    runtime::runtime()?.block_on(async move {
        let skip = spool
            .source_cursor()
            .and_then(|c| <[u8; 8]>::try_from(c).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        if skip > 0 {
            tracing::info!(
                lines = skip,
                pending = spool.len(),
                "resuming: skipping lines already spooled"
            );
        }
        let max_event = tandem_protocol::codec::max_event(config.max_frame);
        let mut client = PairClient::start(config, spool);
        let started = Instant::now();
        let outcome = feed(&mut client, input, skip, args.rate, timeout, max_event).await;
        let result = match outcome {
            Ok(summary) => {
                let waited = client.wait_acked(timeout).await;
                // Done with this input: the next run of the same file starts from its top.
                if waited.is_ok() {
                    client
                        .push(now_ms(), Vec::new(), Some(0u64.to_be_bytes().to_vec()))
                        .await
                        .ok();
                }
                (summary, waited)
            }
            Err(e) => (Summary::default(), Err(e)),
        };
        let stats = client.stats();
        client.close().await;
        report(result.0, &stats, result.1, args.json, started.elapsed())
    })
}

#[derive(Default)]
struct Summary {
    read: u64,
    bad_lines: Vec<(u64, String)>,
}

async fn feed(
    client: &mut PairClient,
    input: Box<dyn BufRead>,
    skip: u64,
    rate: Option<u64>,
    timeout: Duration,
    max_event: usize,
) -> Result<Summary, PairError> {
    let mut summary = Summary::default();
    let mut bodies: Vec<EventBody> = Vec::with_capacity(CHUNK);
    let mut time = now_ms();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut line_no = 0u64;
    let mut lines = input.lines();
    // With a rate, hand over 10 ms worth at a time: sleeping per line would cost a timer tick
    // (a millisecond) each and never reach the rate.
    let chunk = rate
        .filter(|r| *r > 0)
        .map_or(CHUNK, |r| (r / 100).clamp(1, CHUNK as u64) as usize);
    loop {
        let line = match tokio::task::block_in_place(|| lines.next()) {
            Some(Ok(line)) => Some(line),
            Some(Err(e)) => {
                summary
                    .bad_lines
                    .push((line_no + 1, format!("unreadable: {e}")));
                None
            }
            None => None,
        };
        let end = line.is_none();
        if let Some(line) = line {
            line_no += 1;
            if line_no <= skip || line.trim().is_empty() {
                continue;
            }
            summary.read += 1;
            match alert_json::parse(&line) {
                Ok((fields, at)) => {
                    // A batch shares one event time; a line with its own time starts a new one.
                    if let Some(at) = at {
                        if at != time && !bodies.is_empty() {
                            flush(client, &mut bodies, time, line_no - 1).await?;
                        }
                        time = at;
                    }
                    let body = EventBody::Occurrence(fields.pack());
                    match too_large(&line, &body, max_event) {
                        None => bodies.push(body),
                        Some(why) => {
                            tracing::warn!(line = line_no, "skipped: {why}");
                            summary.bad_lines.push((line_no, why));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(line = line_no, "skipped: {e}");
                    summary.bad_lines.push((line_no, e.0));
                }
            }
        }
        if bodies.len() >= chunk || (end && !bodies.is_empty()) {
            sent += bodies.len() as u64;
            flush(client, &mut bodies, time, line_no).await?;
            time = now_ms();
            if let Some(rate) = rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            wait_below(client, MAX_PENDING, timeout).await?;
        }
        if end {
            return Ok(summary);
        }
    }
}

/// Why the alert on `line` is more than the pair can carry, if it is: the spool would refuse
/// it, and with it the lines around it.
fn too_large(line: &str, body: &EventBody, max_event: usize) -> Option<String> {
    // Encoded, an alert is at most its JSON line and a few varints: only a long line is
    // encoded to be sure.
    if line.len() + ENCODING_SLACK <= max_event {
        return None;
    }
    let len =
        tandem_protocol::codec::to_bytes(body).map_or(usize::MAX, |b| b.len()) + ENCODING_SLACK;
    (len > max_event).then(|| {
        format!(
            "the alert is {len} bytes encoded, over the {max_event} bytes the pair can carry (shorten its summary or extra fields, or raise max_frame_bytes in the pair file)"
        )
    })
}

/// Bytes an event takes besides its alert: the origin, seq, time, and the varints of the
/// alert's fields.
const ENCODING_SLACK: usize = 1024;

async fn flush(
    client: &PairClient,
    bodies: &mut Vec<EventBody>,
    time: i64,
    line_no: u64,
) -> Result<(), PairError> {
    let chunk = std::mem::take(bodies);
    client
        .push(time, chunk, Some(line_no.to_be_bytes().to_vec()))
        .await
}

async fn wait_below(
    client: &mut PairClient,
    limit: u64,
    timeout: Duration,
) -> Result<(), PairError> {
    let deadline = Instant::now() + timeout;
    while client.stats().pending > limit {
        if let Some(reason) = client.stats().gave_up {
            return Err(PairError::GaveUp(reason));
        }
        if Instant::now() > deadline {
            return Err(PairError::Timeout {
                pending: client.stats().pending,
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn report(
    summary: Summary,
    stats: &Stats,
    outcome: Result<Stats, PairError>,
    json: bool,
    elapsed: Duration,
) -> Result<()> {
    let rejected = stats.rejected + summary.bad_lines.len() as u64;
    let gap = stats.max_ack_gap.as_millis() as u64;
    if json {
        let reasons: Vec<serde_json::Value> = stats
            .rejections
            .iter()
            .map(|(reason, n)| serde_json::json!({"reason": reason, "events": n}))
            .chain(
                summary
                    .bad_lines
                    .iter()
                    .map(|(line, reason)| serde_json::json!({"reason": reason, "line": line})),
            )
            .collect();
        say!(
            "{}",
            serde_json::json!({
                "read": summary.read,
                "acked": stats.acked,
                "rejected": rejected,
                "failovers": stats.failovers,
                "max_ack_gap_ms": gap,
                "pending": stats.pending,
                "seconds": elapsed.as_secs_f64(),
                "rejections": reasons,
            })
        );
    } else {
        for (reason, n) in &stats.rejections {
            say!("refused by the pair ({n} events): {reason}");
        }
        say!(
            "read {}, acknowledged {}, rejected {rejected}, failovers {}, longest wait for an acknowledgement {gap} ms",
            summary.read,
            stats.acked,
            stats.failovers
        );
    }
    match outcome {
        Err(e) => bail!("{e}"),
        Ok(_) if rejected > 0 => bail!(
            "{rejected} of {} alerts were rejected (see above)",
            summary.read
        ),
        Ok(_) => Ok(()),
    }
}
