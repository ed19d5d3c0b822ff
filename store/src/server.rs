//! The store's TCP side: the accept loop and one handler per connection.
//!
//! The listener caps connections with a semaphore and backs off on accept errors; each handler
//! does the handshake, then serves events (many batches in flight, answered as their group
//! commits), change-log subscriptions, replication, queries and status. A bad frame is answered
//! with an error that names the problem and, where the stream is still in step, the connection
//! goes on; nothing a peer sends can touch another connection or the stored data.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use tandem_protocol::message::LogEntry;
use tandem_protocol::{
    Message, MessageCodec, PROTOCOL_VERSION, RejectReason, Role, StoreStatus, Welcome,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::engine::{Reply, Request, Shared};
use crate::query;

/// Batches one connection may have waiting for their commit; past it the handler stops
/// reading, which pushes back on the sender.
const MAX_PENDING_BATCHES: usize = 256;

/// Log entries sent in one `LogEntries` message.
const LOG_CHUNK: usize = 1_000;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the listener.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub role: Role,
    pub max_frame: usize,
    pub max_connections: usize,
}

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Request>,
    options: ServerOptions,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(options.max_connections));
    let mut handlers = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => {
                backoff = Duration::from_millis(5);
                conn
            }
            Err(e) => {
                // Out of file descriptors and similar: wait instead of spinning.
                tracing::warn!(error = %e, "accept failed; backing off {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = Handler {
            shared: shared.clone(),
            tx: tx.clone(),
            options: options.clone(),
            shutdown: shutdown.child_token(),
            peer: peer.to_string(),
        };
        handlers.spawn(async move {
            let _permit = permit;
            handler.run(stream).await;
        });
        // Reap finished handlers so the set does not grow with every connection ever made.
        while handlers.try_join_next().is_some() {}
    }
    shutdown.cancel();
    while handlers.join_next().await.is_some() {}
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

type Conn = Framed<TcpStream, MessageCodec>;

/// Waits for a batch's commit; one function so every pending batch is the same future type.
async fn answer_of(
    batch: u64,
    rx: oneshot::Receiver<Reply>,
) -> (u64, Result<Reply, oneshot::error::RecvError>) {
    (batch, rx.await)
}

impl Handler {
    async fn run(self, stream: TcpStream) {
        let mut conn = Framed::new(stream, MessageCodec::new(self.options.max_frame));
        let client = match self.handshake(&mut conn).await {
            Some(client) => client,
            None => return,
        };
        tracing::debug!(peer = %self.peer, client = %client, "connected");
        if let Err(e) = self.serve(&mut conn).await {
            tracing::info!(peer = %self.peer, client = %client, error = %e, "connection closed");
        }
    }

    async fn handshake(&self, conn: &mut Conn) -> Option<String> {
        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.next()).await;
        let reject = |reason, message: String| Message::Reject { reason, message };
        let answer = match first {
            Ok(Some(Ok(Ok(Message::Hello(hello))))) => {
                if hello.version != PROTOCOL_VERSION {
                    reject(
                        RejectReason::UnsupportedVersion {
                            supported: PROTOCOL_VERSION,
                        },
                        format!(
                            "protocol version {} is not supported; this store speaks {PROTOCOL_VERSION}",
                            hello.version
                        ),
                    )
                } else {
                    let welcome = Message::Welcome(Welcome {
                        version: PROTOCOL_VERSION,
                        name: self.shared.name.clone(),
                        role: self.options.role,
                        acting_primary: self.shared.acting_primary.load(Ordering::Relaxed),
                        resynced: self.shared.resynced.load(Ordering::Relaxed),
                    });
                    if conn.send(&welcome).await.is_err() {
                        return None;
                    }
                    return Some(format!("{:?} {}", hello.kind, hello.name));
                }
            }
            Ok(Some(Ok(Ok(other)))) => reject(
                RejectReason::BadRequest,
                format!("expected Hello as the first message, got {}", other.name()),
            ),
            Ok(Some(Ok(Err(bad)))) => reject(
                RejectReason::BadRequest,
                format!("the first frame is not a tandem Hello: {bad}"),
            ),
            Ok(Some(Err(e))) => reject(RejectReason::BadRequest, e.to_string()),
            Ok(None) => return None,
            Err(_) => reject(
                RejectReason::BadRequest,
                format!("no Hello within {HANDSHAKE_TIMEOUT:?}"),
            ),
        };
        if let Message::Reject { message, .. } = &answer {
            tracing::warn!(peer = %self.peer, "refused connection: {message}");
        }
        let _ = conn.send(&answer).await;
        None
    }

    async fn serve(&self, conn: &mut Conn) -> Result<(), String> {
        let mut pending = FuturesUnordered::new();
        let mut subscription: Option<Subscription> = None;
        let mut head = self.shared.head.subscribe();
        loop {
            tokio::select! {
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
                            let (reply, rx) = oneshot::channel();
                            self.submit(Request::Events { events, reply }).await?;
                            pending.push(answer_of(batch, rx));
                        }
                        Message::Replicate { batch, peer, cursor, entries } => {
                            let (reply, rx) = oneshot::channel();
                            self.submit(Request::Replicate { peer, cursor, entries, reply }).await?;
                            pending.push(answer_of(batch, rx));
                        }
                        Message::Subscribe { from_lsn, skip_source } => {
                            subscription = Some(Subscription { next: from_lsn.max(1), skip_source });
                            self.push_log(conn, &mut subscription).await?;
                        }
                        other => {
                            let answer = self.answer(other);
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
                }
                changed = head.changed(), if subscription.is_some() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    self.push_log(conn, &mut subscription).await?;
                }
                _ = self.shutdown.cancelled() => return Ok(()),
            }
        }
    }

    async fn submit(&self, request: Request) -> Result<(), String> {
        self.tx
            .send(request)
            .await
            .map_err(|_| "the store is shutting down".to_string())
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
            let want = ((head - sub.next + 1) as usize).min(LOG_CHUNK);
            let entries = self
                .shared
                .db
                .read_log(sub.next, want)
                .map_err(|e| e.to_string())?;
            let Some(last) = entries.last().map(|e| e.lsn) else {
                return Ok(());
            };
            if entries.first().map(|e| e.lsn) != Some(sub.next) {
                // Trimmed while this subscriber was reading: it has a gap and must resync.
                let first = self.shared.first_lsn.load(Ordering::Relaxed);
                conn.send(&Message::LogTrimmed { first_lsn: first })
                    .await
                    .map_err(|e| e.to_string())?;
                *subscription = None;
                return Ok(());
            }
            sub.next = last + 1;
            let entries: Vec<LogEntry> = match &sub.skip_source {
                Some(skip) => entries.into_iter().filter(|e| e.source != *skip).collect(),
                None => entries,
            };
            conn.send(&Message::LogEntries {
                entries,
                head_lsn: head,
            })
            .await
            .map_err(|e| e.to_string())?;
        }
    }

    fn answer(&self, msg: Message) -> Message {
        match msg {
            Message::Ping { nonce } => Message::Pong { nonce },
            Message::StatusRequest => Message::Status(self.status()),
            Message::Query(q) => {
                let alerts: Vec<_> = match self.shared.table.read() {
                    Ok(table) => table.alerts().collect(),
                    Err(_) => {
                        return Message::Error {
                            message: "the alert table is unavailable".into(),
                        };
                    }
                };
                match query::run(alerts.iter(), &q) {
                    Ok((alerts, total)) => Message::Alerts { alerts, total },
                    Err(e) => Message::Error {
                        message: format!("filter: {}", e.render(&q.filter)),
                    },
                }
            }
            Message::GetCursor { peer } => match self.shared.db.cursor(&peer) {
                Ok(lsn) => Message::Cursor { peer, lsn },
                Err(e) => Message::Error {
                    message: e.to_string(),
                },
            },
            Message::ResyncFinished { gateway } => {
                self.shared.resynced.store(true, Ordering::Relaxed);
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
            peer_up: false,
            alerts: self.shared.alert_count(),
            lsn: self.shared.head_lsn(),
            first_lsn: self.shared.first_lsn.load(Ordering::Relaxed),
            clients: 0,
        }
    }
}
