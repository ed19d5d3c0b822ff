//! The store's TCP side: the accept loop and one handler per connection.
//!
//! The listener caps connections with a semaphore and backs off on accept errors; each handler
//! does the handshake, then serves events (many batches in flight, answered as their group
//! commits), change-log subscriptions, replication, queries and status. A bad frame is answered
//! with an error that names the problem and, where the stream is still in step, the connection
//! goes on; nothing a peer sends can touch another connection or the stored data.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::stream::FuturesOrdered;
use futures::{SinkExt, StreamExt};
use tandem_net::tls::Stream;
use tandem_net::{HANDSHAKE_TIMEOUT, WhenFull, check_hello};
use tandem_protocol::LogEntriesFrame;
use tandem_protocol::message::LogBatch;
use tandem_protocol::{
    ClientKind, Message, MessageCodec, PROTOCOL_VERSION, RejectReason, Role, StoreStatus, Welcome,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::engine::{Leftovers, Reply, Request, Shared};
use crate::query;
use crate::table::Incoming;

/// Batches one connection may have waiting for their commit; past it the handler stops
/// reading, which pushes back on the sender.
const MAX_PENDING_BATCHES: usize = 256;

/// Log entries sent in one `LogEntries` message, at most: about one of the primary's commit
/// groups under load. Each message is a `Replicate` the backup takes in, commits and
/// acknowledges with a thread hand-off or three; a quarter as many messages as with 1,000
/// took about 3 % of the pair's CPU off and let the backup keep level with the primary under
/// load (docs/PERFORMANCE.md). Only a subscriber that is behind gets messages this large. What
/// the receiver holds at once is bounded by the gateway's batches in flight (eight), well
/// under the `MAX_PENDING_BATCHES` a connection may have queued.
const LOG_CHUNK: usize = 4_096;

/// A subscriber at least this many entries behind the head reads the log on a blocking
/// thread: further back than the entries a commit group or two adds, which are still in
/// memory.
const FAR_BEHIND: u64 = 100_000;

/// Settings of the listener.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub role: Role,
    pub on_role_change: Option<String>,
    pub max_frame: usize,
    pub max_connections: usize,
    /// `sync` replication: how long an acknowledgement waits for the peer.
    pub sync_replication: Option<std::time::Duration>,
    pub tls: Option<Arc<tandem_net::tls::ServerTls>>,
    /// How often a connection this store is not reading is sent a `Pong` anyway.
    pub keepalive: std::time::Duration,
}

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Request>,
    options: ServerOptions,
    shutdown: CancellationToken,
) {
    let max = options.max_connections;
    let child = shutdown.clone();
    tandem_net::accept_loop(
        listener,
        options.tls.clone(),
        max,
        WhenFull::Wait,
        shutdown,
        move |incoming, peer, permit| {
            let handler = Handler {
                shared: shared.clone(),
                tx: tx.clone(),
                options: options.clone(),
                shutdown: child.child_token(),
                peer: peer.to_string(),
            };
            async move {
                let _permit = permit;
                if let Some(stream) = incoming.open().await {
                    handler.run(stream).await;
                }
            }
        },
    )
    .await;
}

struct Handler {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Request>,
    options: ServerOptions,
    shutdown: CancellationToken,
    peer: String,
}

/// A change-log subscription: the next LSN to send and whose entries to leave out.
struct Subscription {
    next: u64,
    skip_source: Option<String>,
}

type Conn = Framed<Stream, MessageCodec>;

/// Waits for a batch's commit and, in `sync` replication, for the peer to have it too; one
/// function so every pending batch is the same future type.
async fn answer_of(
    batch: u64,
    rx: oneshot::Receiver<Reply>,
    sync: Option<(Arc<Shared>, std::time::Duration)>,
) -> (u64, Result<Reply, oneshot::error::RecvError>) {
    let reply = rx.await;
    if let (Ok(Reply::Ack { .. }), Some((shared, timeout))) = (&reply, sync) {
        wait_for_peer(&shared, timeout).await;
    }
    (batch, reply)
}

/// Holds an acknowledgement until the peer has applied this store's log up to its head as of
/// the commit (which covers the batch), or until `timeout`: then replication degrades to
/// async, so that a peer that is gone does not add the timeout to every batch, until the
/// peer catches up again.
async fn wait_for_peer(shared: &Shared, timeout: std::time::Duration) {
    if shared.sync_degraded.load(Ordering::Relaxed) {
        return;
    }
    let lsn = shared.head_lsn();
    let mut cursor = shared.peer_cursor.subscribe();
    let confirmed = tokio::time::timeout(timeout, cursor.wait_for(|c| *c >= lsn)).await;
    if !matches!(confirmed, Ok(Ok(_))) && !shared.sync_degraded.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            lsn,
            peer_cursor = *shared.peer_cursor.borrow(),
            timeout_ms = timeout.as_millis() as u64,
            "the peer store has not confirmed in time: replication degrades to async until it catches up"
        );
        metrics::counter!("tandem_store_sync_degraded_total").increment(1);
    }
}

impl Handler {
    async fn run(self, stream: Stream) {
        let mut conn = Framed::new(
            stream,
            MessageCodec::new(self.options.max_frame).keeping_record_bytes(),
        );
        let Some((kind, client)) = self.handshake(&mut conn).await else {
            return;
        };
        tracing::debug!(peer = %self.peer, client = %client, ?kind, "connected");
        if let Err(e) = self.serve(&mut conn, kind).await {
            tracing::info!(peer = %self.peer, client = %client, error = %e, "connection closed");
        }
    }

    async fn handshake(&self, conn: &mut Conn) -> Option<(ClientKind, String)> {
        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.next()).await;
        match check_hello(first, &self.shared.name) {
            Ok(hello)
                if self.shared.stalled.load(Ordering::Relaxed)
                    && matches!(hello.kind, ClientKind::Probe | ClientKind::Proxy) =>
            {
                let reject = Message::Reject {
                    reason: RejectReason::StoreUnavailable,
                    message: format!(
                        "{}'s commits are stuck; use the other member of the pair",
                        self.shared.name
                    ),
                };
                let _ = conn.send(&reject).await;
                None
            }
            Ok(hello) => {
                let welcome = Message::Welcome(Welcome {
                    version: PROTOCOL_VERSION,
                    name: self.shared.name.clone(),
                    role: self.options.role,
                    acting_primary: self.shared.acting_primary.load(Ordering::Relaxed),
                    resynced: self.shared.resynced.load(Ordering::Relaxed),
                });
                conn.send(&welcome).await.ok()?;
                Some((hello.kind, hello.name))
            }
            Err(Some(reject)) => {
                if let Message::Reject { message, .. } = &reject {
                    tracing::warn!(peer = %self.peer, "refused connection: {message}");
                }
                let _ = conn.send(&reject).await;
                None
            }
            Err(None) => None,
        }
    }

    async fn serve(&self, conn: &mut Conn, kind: ClientKind) -> Result<(), String> {
        // Answers in the order the batches came: the gateway pairs each answer with its oldest
        // batch in flight. (Unordered, an answer whose reply raced the polling of an older one
        // overtook it.)
        let mut pending = FuturesOrdered::new();
        let mut subscription: Option<Subscription> = None;
        let mut head = self.shared.head.subscribe();
        // Directives move probes (directly or through their proxy); the gateway's and
        // operators' own links stay where they are.
        let moved = matches!(kind, ClientKind::Probe | ClientKind::Proxy);
        let mut directives = self.shared.directives.subscribe();
        let mut role_changes = self.shared.role_changes.subscribe();
        // The fields this connection's events displace, freed here (see `Leftovers`).
        let leftovers = Arc::new(Leftovers::default());
        // While batches wait on a commit slower than the client's `dead_after`, this handler
        // does not read the client, so its pings wait unanswered; a Pong each heartbeat says
        // the store is alive, only slow (its commit watchdog is the proxy's stall check).
        let mut keepalive = tokio::time::interval(self.options.keepalive);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                directive = directives.recv(), if moved => {
                    if let Ok(d) = directive {
                        conn.send(&Message::Directive(d)).await.map_err(|e| e.to_string())?;
                    }
                }
                change = role_changes.recv(), if kind == ClientKind::Proxy => {
                    if change.is_ok() {
                        // Proxies show the store's role in their handshakes and /active.
                        conn.send(&Message::Status(self.status())).await.map_err(|e| e.to_string())?;
                    }
                }
                frame = conn.next(), if pending.len() < MAX_PENDING_BATCHES => {
                    let msg = match frame {
                        None => return Ok(()),
                        Some(Err(e)) => {
                            let _ = conn.send(&Message::Error { message: e.to_string() }).await;
                            return Err(e.to_string());
                        }
                        Some(Ok(Err(bad))) => {
                            tracing::warn!(peer = %self.peer, error = %bad, "refused a frame");
                            let answer = match bad.batch {
                                Some(batch) => Message::Refused { batch, index: 0, reason: bad.to_string() },
                                None => Message::Error { message: bad.to_string() },
                            };
                            conn.send(&answer).await.map_err(|e| e.to_string())?;
                            continue;
                        }
                        Some(Ok(Ok(msg))) => msg,
                    };
                    match msg {
                        Message::Events { batch, events } => {
                            let encoded = conn.codec_mut().take_record_bytes();
                            let (reply, rx) = oneshot::channel();
                            // An event that could not go alone into a page of the log would
                            // stop the gateway at it: refused here, in its turn among the answers.
                            let max_event = tandem_protocol::codec::max_event(conn.codec().max_frame());
                            if let Some((index, len)) = encoded.iter().map(<[u8]>::len).enumerate().find(|&(_, len)| len > max_event) {
                                let reason = format!("event {index} is {len} bytes encoded, over the {max_event} bytes the pair can carry (shorten its text or extra fields, or raise max_frame_bytes in the pair file)");
                                let _ = reply.send(Reply::Refused { index: index as u32, reason });
                                pending.push_back(answer_of(batch, rx, None));
                                continue;
                            }
                            self.submit(conn, &mut keepalive, Request::Events { events, encoded, reply, leftovers: Some(leftovers.clone()) }).await?;
                            let sync = self.options.sync_replication.map(|t| (self.shared.clone(), t));
                            pending.push_back(answer_of(batch, rx, sync));
                        }
                        Message::Replicate { batch, peer, after, cursor, entries } => {
                            let (reply, rx) = oneshot::channel();
                            self.submit(conn, &mut keepalive, Request::Replicate { peer, after, cursor, entries, reply }).await?;
                            pending.push_back(answer_of(batch, rx, None));
                        }
                        Message::Merge { batch, peer, mut chunk } => {
                            let (reply, rx) = oneshot::channel();
                            // Each state's own reference to the frame, taken here rather than
                            // on the commit thread.
                            let encoded = conn.codec_mut().take_record_bytes().into_bytes().collect();
                            // Rows built here, off the commit thread.
                            let rows = std::mem::take(&mut chunk.alerts)
                                .into_iter()
                                .map(|(id, state)| Incoming::new(id, state))
                                .collect();
                            self.submit(conn, &mut keepalive, Request::Merge { peer, chunk: *chunk, rows, encoded, reply }).await?;
                            pending.push_back(answer_of(batch, rx, None));
                        }
                        Message::SnapshotRequest { peer, snapshot, after, limit } => {
                            // The page is read straight into the write buffer, its alert states
                            // as stored. The buffer goes with the read and comes back holding
                            // the frame (every send flushes, so it holds nothing else).
                            let shared = self.shared.clone();
                            let max_frame = conn.codec().max_frame();
                            let mut buf = std::mem::take(conn.write_buffer_mut());
                            let page = tokio::task::spawn_blocking(move || {
                                let page = shared.snapshots.page(&shared.db, &peer, snapshot, after, limit as usize, &mut buf, max_frame);
                                (buf, page)
                            })
                            .await;
                            let sent = match page {
                                Ok((buf, page)) => {
                                    *conn.write_buffer_mut() = buf;
                                    match page {
                                        Ok(()) => SinkExt::<&Message>::flush(conn).await,
                                        Err(e) => conn.send(&Message::Error { message: format!("snapshot: {e}") }).await,
                                    }
                                }
                                Err(e) => conn.send(&Message::Error { message: format!("snapshot: {e}") }).await,
                            };
                            sent.map_err(|e| e.to_string())?;
                        }
                        Message::CursorReport { peer, lsn } => {
                            // How far the peer has applied this store's log; answered with
                            // nothing, as it comes on a subscription's stream.
                            self.shared.peer_cursor.send_replace(lsn);
                            if lsn >= self.shared.head_lsn() && self.shared.sync_degraded.swap(false, Ordering::Relaxed) {
                                tracing::info!(peer, lsn, "the peer store has caught up: replication is sync again");
                            }
                            tracing::trace!(peer, lsn, "peer cursor");
                        }
                        Message::Subscribe { from_lsn, skip_source } => {
                            let head = self.shared.head_lsn();
                            if from_lsn > head + 1 {
                                // The subscriber has applied entries this store no longer has:
                                // its data was lost and the log started again. Only a full
                                // resync brings the subscriber in line.
                                tracing::warn!(peer = %self.peer, from_lsn, head, "a subscriber is ahead of this store's log; it needs a full resync");
                                let first = self.shared.first_lsn.load(Ordering::Relaxed);
                                conn.send(&Message::LogTrimmed { first_lsn: first }).await.map_err(|e| e.to_string())?;
                                continue;
                            }
                            subscription = Some(Subscription { next: from_lsn.max(1), skip_source });
                            if from_lsn.max(1) > head && from_lsn.max(1) >= self.shared.first_lsn.load(Ordering::Relaxed) {
                                // Nothing to send yet: say where the head is, so the subscriber
                                // knows it has caught up.
                                conn.send(&Message::LogEntries { entries: LogBatch::default(), last_lsn: head, head_lsn: head })
                                    .await
                                    .map_err(|e| e.to_string())?;
                            }
                            self.push_log(conn, &mut subscription).await?;
                        }
                        Message::Query(q) => {
                            // Off the async workers: it reads the whole table, under the lock
                            // that a commit holds.
                            let shared = self.shared.clone();
                            let max_frame = conn.codec().max_frame();
                            let answer = tokio::task::spawn_blocking(move || run_query(&shared, &q, max_frame))
                                .await
                                .unwrap_or_else(|e| Message::Error { message: format!("query: {e}") });
                            conn.send(&answer).await.map_err(|e| e.to_string())?;
                        }
                        other => {
                            let answer = self.answer(other, kind);
                            conn.send(&answer).await.map_err(|e| e.to_string())?;
                        }
                    }
                }
                Some((batch, reply)) = pending.next() => {
                    let answer = match reply {
                        Ok(Reply::Ack { applied, duplicates }) => Message::Ack { batch, applied, duplicates },
                        Ok(Reply::Refused { index, reason }) => Message::Refused { batch, index, reason },
                        Err(_) => Message::Error { message: "the store is shutting down".into() },
                    };
                    conn.send(&answer).await.map_err(|e| e.to_string())?;
                    // After the answer, which need not wait for it.
                    leftovers.free();
                }
                changed = head.changed(), if subscription.is_some() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    self.push_log(conn, &mut subscription).await?;
                }
                _ = keepalive.tick(), if pending.len() >= MAX_PENDING_BATCHES => {
                    self.keepalive(conn).await?;
                }
                _ = self.shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Tells a client this store is alive though it is not reading it; not once the commit
    /// is stalled, so that the client's own heartbeat gives up on it too.
    async fn keepalive(&self, conn: &mut Conn) -> Result<(), String> {
        if self.shared.stalled.load(Ordering::Relaxed) {
            return Ok(());
        }
        conn.send(&Message::Pong { nonce: 0 })
            .await
            .map_err(|e| e.to_string())
    }

    /// Queues `request` for the commit thread. A full queue means commits are behind: the
    /// client still gets its keepalive meanwhile.
    async fn submit(
        &self,
        conn: &mut Conn,
        keepalive: &mut tokio::time::Interval,
        request: Request,
    ) -> Result<(), String> {
        loop {
            tokio::select! {
                biased;
                permit = self.tx.reserve() => {
                    let permit = permit.map_err(|_| "the store is shutting down".to_string())?;
                    permit.send(request);
                    return Ok(());
                }
                _ = keepalive.tick() => self.keepalive(conn).await?,
            }
        }
    }

    /// Sends every durable entry the subscriber has not had yet.
    async fn push_log(
        &self,
        conn: &mut Conn,
        subscription: &mut Option<Subscription>,
    ) -> Result<(), String> {
        let Some(sub) = subscription.as_mut() else {
            return Ok(());
        };
        let first = self.shared.first_lsn.load(Ordering::Relaxed);
        if sub.next < first {
            conn.send(&Message::LogTrimmed { first_lsn: first })
                .await
                .map_err(|e| e.to_string())?;
            *subscription = None;
            return Ok(());
        }
        loop {
            let head = self.shared.head_lsn();
            if sub.next > head {
                return Ok(());
            }
            let newest = sub
                .skip_source
                .as_deref()
                .map(|skip| self.shared.log_sources.newest(skip));
            if let Some(newest) = newest {
                if newest.others < sub.next {
                    // Every entry it has not had came from the source it leaves out: its new
                    // position, without reading the log.
                    sub.next = head + 1;
                    conn.send(&Message::LogEntries {
                        entries: LogBatch::default(),
                        last_lsn: head,
                        head_lsn: head,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                    continue;
                }
            }
            let want = ((head - sub.next + 1) as usize).min(LOG_CHUNK);
            // Nothing from the source it leaves out since its position (on the primary, the
            // gateway's subscriber leaves out the backup, which mostly sends nothing): no entry
            // need be looked at for its source.
            let skip = sub
                .skip_source
                .as_deref()
                .filter(|_| newest.is_some_and(|newest| newest.from >= sub.next));
            // As stored: the entries are not decoded on their way out, and are read straight
            // into the connection's write buffer as one `LogEntries` frame.
            let max_frame = conn.codec().max_frame();
            let read = if head - sub.next < FAR_BEHIND {
                // Just written: in the storage engine's memory, read in microseconds.
                read_log_frame(
                    &self.shared,
                    conn.write_buffer_mut(),
                    max_frame,
                    sub.next,
                    want,
                    skip,
                    head,
                )?
            } else {
                // Off the async workers: a subscriber this far behind reads blocks the page
                // cache may not hold, while the workers serve the probes' batches. Not every
                // read: handing each one over cost a store whose subscriber keeps up about a
                // tenth more CPU. The write buffer goes with the read and comes back holding
                // the frame (every send flushes, so it holds nothing else).
                let (from, skip) = (sub.next, skip.map(str::to_owned));
                let shared = self.shared.clone();
                let mut buf = std::mem::take(conn.write_buffer_mut());
                let (buf, read) = tokio::task::spawn_blocking(move || {
                    let read = read_log_frame(
                        &shared,
                        &mut buf,
                        max_frame,
                        from,
                        want,
                        skip.as_deref(),
                        head,
                    );
                    (buf, read)
                })
                .await
                .map_err(|e| format!("reading the log: {e}"))?;
                *conn.write_buffer_mut() = buf;
                read?
            };
            match read {
                LogRead::Nothing => return Ok(()),
                LogRead::Trimmed => {
                    // Trimmed while this subscriber was reading: it has a gap and must resync.
                    let first = self.shared.first_lsn.load(Ordering::Relaxed);
                    conn.send(&Message::LogTrimmed { first_lsn: first })
                        .await
                        .map_err(|e| e.to_string())?;
                    *subscription = None;
                    return Ok(());
                }
                LogRead::Framed { last } => {
                    sub.next = last + 1;
                    SinkExt::<&Message>::flush(conn)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }

    fn answer(&self, msg: Message, kind: ClientKind) -> Message {
        match msg {
            Message::Ping { nonce } => Message::Pong { nonce },
            // The peer's heartbeat: a stalled store is as good as down to its backup.
            Message::StatusRequest
                if kind == ClientKind::Store && self.shared.stalled.load(Ordering::Relaxed) =>
            {
                Message::Error {
                    message: format!("{}'s commits are stuck", self.shared.name),
                }
            }
            Message::StatusRequest => Message::Status(self.status()),
            Message::GetCursor { peer } => {
                let found = self
                    .shared
                    .db
                    .cursor(&peer)
                    .and_then(|lsn| Ok((lsn, self.shared.db.resync_point(&peer)?)));
                match found {
                    Ok((lsn, resync)) => Message::Cursor { peer, lsn, resync },
                    Err(e) => Message::Error {
                        message: e.to_string(),
                    },
                }
            }
            Message::Failback { force } => {
                let input = crate::role::RoleInput::Failback { force };
                match crate::peer::role_input(
                    &self.shared,
                    input,
                    self.options.on_role_change.as_deref(),
                ) {
                    Ok(message) => Message::Done { message },
                    Err(message) => Message::Error { message },
                }
            }
            Message::ResyncFinished { gateway } => {
                let first = !self.shared.resynced.swap(true, Ordering::Relaxed);
                if first {
                    self.shared.notice(
                        "resync",
                        tandem_protocol::Kind::Information,
                        tandem_protocol::Severity::INDETERMINATE,
                        format!(
                            "{} is resynced with its peer (gateway {gateway})",
                            self.shared.name
                        ),
                    );
                }
                tracing::info!(gateway, "resync finished");
                Message::Done {
                    message: "resync recorded".into(),
                }
            }
            other => Message::Error {
                message: format!("{} is not something a store answers", other.name()),
            },
        }
    }

    fn status(&self) -> StoreStatus {
        StoreStatus {
            name: self.shared.name.clone(),
            role: Some(self.options.role),
            acting_primary: self.shared.acting_primary.load(Ordering::Relaxed),
            resynced: self.shared.resynced.load(Ordering::Relaxed),
            peer_up: self.shared.peer_up.load(Ordering::Relaxed),
            alerts: self.shared.alert_count(),
            lsn: self.shared.head_lsn(),
            first_lsn: self.shared.first_lsn.load(Ordering::Relaxed),
            clients: 0,
        }
    }
}

/// What [`read_log_frame`] left in the write buffer.
enum LogRead {
    /// A `LogEntries` frame up to `last`.
    Framed { last: u64 },
    /// Nothing: no entry from the position on.
    Nothing,
    /// Nothing: the log no longer starts at or before the position.
    Trimmed,
}

/// Reads up to `want` log entries from `from` on (leaving out `skip`'s) into a `LogEntries`
/// frame at the end of `buf`, with `head` as the head it reports.
fn read_log_frame(
    shared: &Shared,
    buf: &mut bytes::BytesMut,
    max_frame: usize,
    from: u64,
    want: usize,
    skip: Option<&str>,
    head: u64,
) -> Result<LogRead, String> {
    struct Page<'a> {
        frame: LogEntriesFrame<'a>,
        max_frame: usize,
    }
    impl crate::db::LogSink for Page<'_> {
        fn entry(&mut self, entry: &[u8]) -> bool {
            // Cut where the frame would be over the limit: entries of large alerts make a
            // page of `want` too big to send, and refusing it whole would stall the subscriber.
            let room = self.frame.has_room(entry.len(), self.max_frame);
            if room {
                self.frame.push_encoded(entry);
            }
            room
        }
        fn packed(&mut self, count: usize, unpacked: usize, lz4: &[u8]) -> bool {
            u32::try_from(count)
                .is_ok_and(|count| self.frame.push_packed(count, unpacked, lz4, self.max_frame))
        }
    }
    let mut page = Page {
        frame: LogEntriesFrame::begin(buf),
        max_frame,
    };
    let seen = shared
        .db
        .read_log_raw(from, want, skip, &mut page)
        .map_err(|e| e.to_string())?;
    let frame = page.frame;
    // An unfinished frame takes itself back out of the buffer.
    match seen {
        None => Ok(LogRead::Nothing),
        Some((first, _)) if first != from => Ok(LogRead::Trimmed),
        Some((_, last)) => {
            frame
                .finish(max_frame, last, head)
                .map_err(|e| format!("the log from {from} does not fit a frame: {e}"))?;
            Ok(LogRead::Framed { last })
        }
    }
}

/// An operator's query against the table as of now, its answer cut to what fits a frame of
/// `max_frame` bytes (`total` still counts every match, so the operator sees how many were
/// left out): sent whole, the answer over many large alerts would be refused by the codec and
/// the operator would get only a closed connection.
fn run_query(shared: &Shared, q: &tandem_protocol::Query, max_frame: usize) -> Message {
    let alerts: Vec<_> = match shared.table.read() {
        Ok(table) => table.alerts().collect(),
        Err(_) => {
            return Message::Error {
                message: "the alert table is unavailable".into(),
            };
        }
    };
    match query::run(alerts.iter(), q) {
        Ok((mut alerts, total)) => {
            let budget = tandem_protocol::codec::max_event(max_frame);
            let mut used = 0;
            let fits = alerts
                .iter()
                .take_while(|alert| {
                    used = tandem_protocol::codec::encoded_len(alert)
                        .map_or(usize::MAX, |len| used.saturating_add(len));
                    used <= budget
                })
                .count();
            if fits < alerts.len() {
                tracing::info!(
                    matched = total,
                    sent = fits,
                    "a query's answer was cut to fit a frame"
                );
                alerts.truncate(fits);
            }
            Message::Alerts { alerts, total }
        }
        Err(e) => Message::Error {
            message: format!("filter: {}", e.render(&q.filter)),
        },
    }
}
