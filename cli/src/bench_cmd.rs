//! `tandem bench`: load the virtual pair from P concurrent probes and measure durable throughput
//! and acknowledgement latency.
//!
//! Each probe is a real pair client (the one `tandem send` uses) with a memory spool, so the
//! figures include everything a probe pays for: numbering, spooling, batching, failover. An
//! event counts once its store has made it durable and the acknowledgement is back at the probe.
//! The probes keep a bounded window of events ahead of the acknowledgements (two in-flight
//! windows) so that, without `--rate`, latency measures the pipeline, not an unbounded
//! queue in the benchmark itself.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tandem_config::PairFile;
use tandem_probe::pair::{PairClient, PairError};
use tandem_probe::spool::Spool;
use tandem_protocol::{AlertFields, EventBody, Severity};

use crate::args::BenchArgs;
use crate::probe_config;

/// How long the pair may go without acknowledging anything before the run is abandoned.
const STALL: Duration = Duration::from_secs(60);

/// Events handed to a probe's client at a time (one push, one spool operation).
const CHUNK: u64 = 500;

/// What one run measured.
#[derive(Debug)]
struct Outcome {
    events: u64,
    seconds: f64,
    latency: Histogram<u64>,
    failovers: u64,
    /// The longest any probe waited with events out and no acknowledgement arriving.
    max_ack_gap: Duration,
}

impl Outcome {
    fn events_per_s(&self) -> f64 {
        self.events as f64 / self.seconds.max(1e-9)
    }

    /// Acknowledgement latency at quantile `q`, in milliseconds (recorded in microseconds).
    fn ack_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

pub fn run(pair: &PairFile, data_dir: &Path, args: &BenchArgs) -> Result<()> {
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut configs = Vec::with_capacity(args.probes as usize);
    for probe in 0..args.probes {
        configs.push(probe_config::pair_config(
            pair,
            data_dir,
            &format!("bench-{probe}"),
        )?);
    }
    let progress = if args.json || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(args.events);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {human_pos}/{human_len} acknowledged, {per_sec}, {elapsed} (eta {eta})",
            )
            .context("progress bar template")?,
        );
        bar
    };
    // One thread: the load generator shares the machine with the pair it measures, and on one
    // thread its events are freed where they were built (see docs/PERFORMANCE.md).
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(drive(configs, args, run_id, progress.clone()));
    progress.finish_and_clear();
    let outcome = outcome?;
    if args.json {
        say!(
            "{}",
            serde_json::json!({
                "events": outcome.events,
                "seconds": outcome.seconds,
                "events_per_s": outcome.events_per_s(),
                "ack_p50_ms": outcome.ack_ms(0.5),
                "ack_p99_ms": outcome.ack_ms(0.99),
                "ack_p999_ms": outcome.ack_ms(0.999),
                "probes": args.probes,
                "identifiers": args.identifiers,
                "failovers": outcome.failovers,
                "max_ack_gap_ms": outcome.max_ack_gap.as_secs_f64() * 1000.0,
            })
        );
    } else {
        say!(
            "{} events from {} probes over {} identifiers in {:.2} s: {:.0} events/s acknowledged durable",
            outcome.events,
            args.probes,
            args.identifiers,
            outcome.seconds,
            outcome.events_per_s()
        );
        say!(
            "acknowledgement latency: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            outcome.ack_ms(0.5),
            outcome.ack_ms(0.99),
            outcome.ack_ms(0.999),
            outcome.latency.max() as f64 / 1000.0
        );
        if outcome.failovers > 0 {
            say!(
                "failovers during the run: {}, longest wait for an acknowledgement {} ms",
                outcome.failovers,
                outcome.max_ack_gap.as_millis()
            );
        }
    }
    Ok(())
}

async fn drive(
    configs: Vec<tandem_probe::pair::PairConfig>,
    args: &BenchArgs,
    run_id: u128,
    progress: ProgressBar,
) -> Result<Outcome> {
    let probes = configs.len() as u64;
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (n, config) in configs.into_iter().enumerate() {
        let n = n as u64;
        // Probe n sends events n, n + P, n + 2P, ...: every probe covers every identifier.
        let share = args.events / probes + u64::from(n < args.events % probes);
        let load = Load {
            first: n,
            step: probes,
            count: share,
            identifiers: args.identifiers,
            size: args.size,
            rate: args.rate.map(|r| r as f64 / probes as f64),
            run_id,
        };
        let name = config.client_name.clone();
        let spool = Spool::open(None, &name).with_context(|| format!("probe {name}"))?;
        // Two in-flight windows ahead of the acknowledgements keep the link busy while one is
        // acknowledged, without queueing the whole run in the spool.
        let window = (config.max_in_flight * 2) as u64;
        let client = PairClient::start(config, spool);
        tasks.spawn(probe(client, load, window, acked.clone()));
    }
    let mut latency = Histogram::<u64>::new(3).context("latency histogram")?;
    let mut failovers = 0;
    let mut max_ack_gap = Duration::ZERO;
    let mut last_ack = started;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            done = tasks.join_next() => match done {
                None => break,
                Some(Ok(Ok(result))) => {
                    latency.add(&result.latency).context("merging latencies")?;
                    failovers += result.failovers;
                    max_ack_gap = max_ack_gap.max(result.max_ack_gap);
                    last_ack = last_ack.max(result.last_ack);
                }
                Some(Ok(Err(e))) => {
                    tasks.abort_all();
                    return Err(e);
                }
                Some(Err(e)) => {
                    tasks.abort_all();
                    bail!("a benchmark probe failed: {e}");
                }
            },
            _ = tick.tick() => progress.set_position(acked.load(Ordering::Relaxed)),
        }
    }
    Ok(Outcome {
        events: args.events,
        seconds: last_ack.duration_since(started).as_secs_f64(),
        latency,
        failovers,
        max_ack_gap,
    })
}

/// What one probe sends.
struct Load {
    first: u64,
    step: u64,
    count: u64,
    identifiers: u64,
    size: usize,
    /// Events per second for this probe.
    rate: Option<f64>,
    run_id: u128,
}

struct ProbeResult {
    latency: Histogram<u64>,
    failovers: u64,
    max_ack_gap: Duration,
    last_ack: Instant,
}

/// Sends one probe's share and records, for every chunk, the time from handing it to the
/// client to its last event being acknowledged.
async fn probe(
    mut client: PairClient,
    load: Load,
    window: u64,
    total_acked: Arc<AtomicU64>,
) -> Result<ProbeResult> {
    let result = send_all(&mut client, &load, window, &total_acked).await;
    let stats = client.stats();
    client.close().await;
    let (latency, last_ack) = result?;
    Ok(ProbeResult {
        latency,
        failovers: stats.failovers,
        max_ack_gap: stats.max_ack_gap,
        last_ack,
    })
}

/// Greatest common divisor, `gcd(a, 0) == a`.
fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

async fn send_all(
    client: &mut PairClient,
    load: &Load,
    window: u64,
    total_acked: &AtomicU64,
) -> Result<(Histogram<u64>, Instant)> {
    let mut acks = Acks {
        watch: client.watch(),
        chunks: VecDeque::new(),
        acked: 0,
        last_ack: Instant::now(),
        latency: Histogram::<u64>::new(3).context("latency histogram")?,
    };
    let mut pushed = 0u64;
    let started = Instant::now();
    let summary = summary_text(load.size);
    // This probe's events repeat with a period: event i is identifier (first + i * step) mod
    // K. One period of them is built once and pushed range by range without copying, so
    // that the load generator takes as little as it can of the CPU the pair under test runs
    // on (cloning each event's fields was a tenth of it). A period is at most K events, as
    // many as the fields built per probe before.
    let period = load.identifiers / gcd(load.identifiers, load.step % load.identifiers);
    let cycle: std::sync::Arc<[EventBody]> = (0..period)
        .map(|i| {
            let identifier = format!(
                "bench-{:x}-{}",
                load.run_id,
                (load.first + i * load.step) % load.identifiers
            );
            EventBody::Occurrence(
                AlertFields {
                    node: identifier.clone(),
                    identifier,
                    summary: summary.clone(),
                    severity: Severity::MINOR,
                    ..AlertFields::default()
                }
                .pack(),
            )
        })
        .collect();
    loop {
        if acks.watch.has_changed().unwrap_or(true) {
            acks.take(total_acked)?;
        }
        if acks.acked >= load.count {
            return Ok((acks.latency, acks.last_ack));
        }
        let can_push = pushed < load.count && pushed - acks.acked < window;
        let due = load.rate.and_then(|rate| {
            let at = started + Duration::from_secs_f64(pushed as f64 / rate);
            (at > Instant::now()).then_some(tokio::time::Instant::from_std(at))
        });
        if can_push && due.is_none() {
            let n = CHUNK.min(load.count - pushed);
            let (at, time) = (Instant::now(), now_ms());
            // The chunk's events as ranges of the period, split where it wraps.
            let mut next = pushed;
            while next < pushed + n {
                let start = next % period;
                let len = (pushed + n - next).min(period - start);
                let range = start as usize..(start + len) as usize;
                client.push_shared(time, cycle.clone(), range).await?;
                next += len;
            }
            acks.chunks.push_back((pushed, pushed + n, at));
            pushed += n;
            continue;
        }
        let sleep = match (can_push, due) {
            (true, Some(due)) => due,
            _ => tokio::time::Instant::now() + STALL,
        };
        tokio::select! {
            changed = acks.watch.changed() => {
                if changed.is_err() {
                    bail!("{}", stopped(client));
                }
            }
            _ = tokio::time::sleep_until(sleep) => {}
        }
        // `changed` marked the new value seen: take it now, not at the top of the loop.
        acks.take(total_acked)?;
        if acks.last_ack.elapsed() > STALL {
            bail!(
                "nothing was acknowledged for {} s ({} of {} events acknowledged); is the pair up?",
                STALL.as_secs(),
                acks.acked,
                load.count
            );
        }
    }
}

/// Follows one probe's acknowledgements and times its chunks.
struct Acks {
    watch: tokio::sync::watch::Receiver<tandem_probe::pair::Stats>,
    /// (first event, one past the last, when it was handed over). Acknowledgements are counted
    /// in order, so a chunk is done once the count acknowledged reaches its end.
    chunks: VecDeque<(u64, u64, Instant)>,
    acked: u64,
    last_ack: Instant,
    latency: Histogram<u64>,
}

impl Acks {
    fn take(&mut self, total_acked: &AtomicU64) -> Result<()> {
        let acked = {
            let stats = self.watch.borrow_and_update();
            if let Some(reason) = &stats.gave_up {
                bail!("a benchmark probe gave up: {reason}");
            }
            if stats.rejected > 0 {
                bail!(
                    "the pair refused {} events ({:?}); a benchmark must be accepted in full",
                    stats.rejected,
                    stats.rejections
                );
            }
            stats.acked
        };
        if acked <= self.acked {
            return Ok(());
        }
        let now = Instant::now();
        total_acked.fetch_add(acked - self.acked, Ordering::Relaxed);
        self.acked = acked;
        self.last_ack = now;
        while let Some(&(start, end, at)) = self.chunks.front() {
            if end > acked {
                break;
            }
            self.latency
                .record_n(now.duration_since(at).as_micros() as u64, end - start)
                .context("recording a latency")?;
            self.chunks.pop_front();
        }
        Ok(())
    }
}

fn stopped(client: &PairClient) -> PairError {
    match client.stats().gave_up {
        Some(reason) => PairError::GaveUp(reason),
        None => PairError::Stopped,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A summary line of about `size` bytes that reads like a real one.
fn summary_text(size: usize) -> String {
    const WORDS: &str =
        "filesystem /var is 91% full (threshold 90%), growth 1.2 GiB/h on volume group vg0; ";
    let mut text = String::with_capacity(size + WORDS.len());
    while text.len() < size {
        text.push_str(WORDS);
    }
    text.truncate(size);
    text
}
