//! The proxy's one link to its store.
//!
//! The link is (re)made with exponential backoff and watched by heartbeat: silence for
//! `dead_after` counts as a dead store, so probes are told to leave well within the failover
//! deadline even when no TCP error arrives (a frozen host, a cut cable). So does a store that
//! keeps answering heartbeats but acknowledges nothing for ten `dead_after`s (at least 2 s)
//! while batches wait (a hung disk): slow commits are waited for, a stuck one is not. Batches from every
//! probe are renumbered onto the link and each answer is routed back to the probe that sent
//! the batch under its own number. Reading from the store never waits on writing to it, so a
//! store that is itself busy writing acknowledgements to us can always make progress.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tandem_probe::{Connection, Writer};
use tandem_protocol::{ClientKind, Directive, EventsFrame, EventsHead, Message};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{ProxyOptions, ProxyState, StoreLink};

/// A probe's batch on its way to the store, as the bytes the probe sent: the proxy reads only
/// its head and never decodes the events.
pub struct Forward {
    pub probe: u64,
    pub head: EventsHead,
    pub frame: BytesMut,
}

/// What goes up the store link.
enum Outgoing {
    Message(Message),
    Events(EventsFrame),
}

/// The connected probes, by id, and where to send their answers.
#[derive(Default)]
pub struct Registry {
    probes: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    next: AtomicU64,
}

impl Registry {
    pub fn register(&self, capacity: usize) -> (u64, mpsc::Receiver<Message>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(capacity);
        if let Ok(mut probes) = self.probes.lock() {
            probes.insert(id, tx);
        }
        (id, rx)
    }

    pub fn unregister(&self, id: u64) {
        if let Ok(mut probes) = self.probes.lock() {
            probes.remove(&id);
        }
    }

    /// Never waits: a probe's channel holds more than its in-flight limit allows, so a full
    /// channel means a probe that is gone or stuck, and dropping its answer only makes it
    /// resend, which the store deduplicates.
    fn route(&self, probe: u64, msg: Message) {
        let sender = self
            .probes
            .lock()
            .ok()
            .and_then(|probes| probes.get(&probe).cloned());
        if let Some(tx) = sender {
            if tx.try_send(msg).is_err() {
                tracing::debug!(probe, "answer for a gone or stuck probe dropped");
            }
        }
    }
}

/// How many `dead_after`s a store may go without acknowledging anything while batches wait,
/// before the proxy gives up on it: long enough for a slow commit (a big checkpoint, a busy
/// disk), short enough that probes leave a store whose disk hangs.
const STALL_FACTOR: u32 = 10;
/// Whatever the deadline, a sync may take this long without the store counting as stuck.
const MIN_STALL: Duration = Duration::from_secs(2);

pub async fn run(
    options: ProxyOptions,
    state: Arc<ProxyState>,
    mut forwards: mpsc::Receiver<Forward>,
    registry: Arc<Registry>,
    directives: broadcast::Sender<Directive>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(20);
    let mut failures = 0u64;
    loop {
        let connect = Connection::connect_tls(
            options.store_addr,
            ClientKind::Proxy,
            &options.name,
            options.max_frame,
            options.dead_after.max(Duration::from_millis(200)),
            options.store_tls.as_deref(),
        );
        let conn = tokio::select! {
            conn = connect => conn,
            _ = shutdown.cancelled() => return,
        };
        match conn {
            Ok(conn) => {
                tracing::info!(store = %options.store_name, addr = %options.store_addr, "store link up");
                backoff = Duration::from_millis(20);
                failures = 0;
                session(
                    &options,
                    &state,
                    conn,
                    &mut forwards,
                    &registry,
                    &directives,
                    &shutdown,
                )
                .await;
                state.link.send_modify(|l| l.up = false);
                metrics::counter!("tandem_proxy_store_link_lost_total").increment(1);
                if shutdown.is_cancelled() {
                    return;
                }
                tracing::warn!(store = %options.store_name, "store link down; probes are told to fail over");
            }
            Err(e) => {
                failures += 1;
                // Say it once, then every 50th attempt, not at every backoff step.
                if failures == 1 || failures % 50 == 0 {
                    tracing::warn!(store = %options.store_name, error = %e, attempts = failures, "cannot reach the store; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn write_loop(mut writer: Writer, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        let sent = match out {
            Outgoing::Message(msg) => writer.send(&msg).await,
            Outgoing::Events(frame) => writer.send_events(frame).await,
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "store link write failed");
            return;
        }
    }
}

async fn session(
    options: &ProxyOptions,
    state: &ProxyState,
    conn: Connection,
    forwards: &mut mpsc::Receiver<Forward>,
    registry: &Registry,
    directives: &broadcast::Sender<Directive>,
    shutdown: &CancellationToken,
) {
    let welcome = conn.welcome.clone();
    let (mut reader, writer) = conn.split();
    let (wtx, wrx) = mpsc::channel::<Outgoing>(256);
    let mut write_task = tokio::spawn(write_loop(writer, wrx));
    state.link.send_replace(StoreLink {
        up: true,
        role: welcome.role,
        acting_primary: welcome.acting_primary,
        resynced: welcome.resynced,
        failed_back: false,
    });
    let mut pending: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut next_batch = 0u64;
    let mut ping = tokio::time::interval(options.heartbeat);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    // The last acknowledgement, or when batches started waiting after none did: a store that
    // answers heartbeats but commits nothing (a hung disk) is dead to its probes all the same.
    let mut last_progress = Instant::now();
    let mut nonce = 0u64;
    let mut writer_gone = false;
    loop {
        tokio::select! {
            // Only take a batch when the writer has room, so this loop never blocks on a full
            // writer and always keeps reading the store's answers.
            forward = forwards.recv(), if wtx.capacity() > 0 => {
                let Some(f) = forward else { break };
                next_batch += 1;
                // Written out under this link's batch id by the codec: not copied here.
                let frame = EventsFrame::Renumbered { batch: next_batch, frame: f.frame.freeze(), head: f.head };
                if pending.is_empty() {
                    last_progress = Instant::now();
                }
                pending.insert(next_batch, (f.probe, f.head.batch));
                let n = f.head.events;
                if wtx.try_send(Outgoing::Events(frame)).is_err() {
                    break;
                }
                state.events_forwarded.fetch_add(n, Ordering::Relaxed);
                metrics::counter!("tandem_proxy_events_forwarded_total").increment(n);
            }
            msg = reader.recv() => {
                let msg = match msg {
                    Ok(msg) => msg,
                    Err(e) => {
                        tracing::warn!(error = %e, "store link lost");
                        break;
                    }
                };
                last_heard = Instant::now();
                match msg {
                    Message::Ack { batch, applied, duplicates } => {
                        last_progress = Instant::now();
                        if let Some((probe, b)) = pending.remove(&batch) {
                            registry.route(probe, Message::Ack { batch: b, applied, duplicates });
                        }
                    }
                    Message::Refused { batch, index, reason } => {
                        last_progress = Instant::now();
                        if let Some((probe, b)) = pending.remove(&batch) {
                            registry.route(probe, Message::Refused { batch: b, index, reason });
                        }
                    }
                    Message::Directive(d) => {
                        tracing::info!(directive = ?d, "passing the store's directive to every probe");
                        if d == Directive::Failback {
                            state.link.send_modify(|l| {
                                l.failed_back = true;
                                l.acting_primary = false;
                            });
                        }
                        let _ = directives.send(d);
                    }
                    Message::Status(status) => {
                        state.link.send_modify(|l| {
                            l.acting_primary = status.acting_primary;
                            l.resynced = status.resynced;
                            if status.acting_primary {
                                l.failed_back = false;
                            }
                        });
                    }
                    Message::Pong { .. } => {}
                    Message::Error { message } => tracing::warn!(store = %options.store_name, "store error: {message}"),
                    other => tracing::debug!(message = other.name(), "unexpected message from the store"),
                }
            }
            _ = ping.tick() => {
                let stalled = (options.dead_after * STALL_FACTOR).max(MIN_STALL);
                if !pending.is_empty() && last_progress.elapsed() > stalled {
                    tracing::warn!(store = %options.store_name, waiting = pending.len(), stalled_ms = last_progress.elapsed().as_millis() as u64, "the store answers heartbeats but has acknowledged nothing; treating it as down");
                    break;
                }
                if last_heard.elapsed() > options.dead_after {
                    tracing::warn!(store = %options.store_name, silent_ms = last_heard.elapsed().as_millis() as u64, "store stopped answering heartbeats");
                    break;
                }
                nonce += 1;
                let _ = wtx.try_send(Outgoing::Message(Message::Ping { nonce }));
            }
            _ = &mut write_task => {
                writer_gone = true;
                break;
            }
            _ = shutdown.cancelled() => break,
        }
    }
    if !writer_gone {
        write_task.abort();
        let _ = write_task.await;
    }
}
