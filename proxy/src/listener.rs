//! Accepting probes: the handshake, per-probe limits, forwarding, and telling probes to go.
//!
//! A probe is refused at once, with the reason, while the store link is down (it fails over in
//! milliseconds instead of waiting for a timeout) and when the proxy holds `max_probes`
//! connections. A connected probe is told to leave the moment the store link drops, and gets
//! every directive the store sends. Each probe may have `max_in_flight_per_probe` events
//! unacknowledged; past that, and while its batch waits for room in the queue to the store, the
//! proxy stops reading from it, which slows it down without dropping anything; its
//! acknowledgements, directives and a `Leave` still reach it meanwhile, and so does a `Pong`
//! each heartbeat, since its own pings wait unread.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tandem_net::tls::Stream;
use tandem_net::{HANDSHAKE_TIMEOUT, WhenFull, check_hello};
use tandem_protocol::codec::{events_head, from_bytes, peek_batch};
use tandem_protocol::{Directive, FrameCodec, Message, PROTOCOL_VERSION, RejectReason, Welcome};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::upstream::{Forward, Registry};
use crate::{ProxyOptions, ProxyState};

/// Batches one probe may have in flight; with the event limit, it bounds the answers waiting
/// for a probe, so the upstream link never has to wait for one.
const MAX_BATCHES_PER_PROBE: usize = 256;

pub async fn serve(
    listener: TcpListener,
    options: ProxyOptions,
    state: Arc<ProxyState>,
    forwards: mpsc::Sender<Forward>,
    registry: Arc<Registry>,
    directives: broadcast::Sender<Directive>,
    shutdown: CancellationToken,
) {
    let max = options.max_probes;
    let child = shutdown.clone();
    let tls = options.tls.clone();
    tandem_net::accept_loop(
        listener,
        tls,
        max,
        WhenFull::Refuse,
        shutdown,
        move |incoming, peer, permit| {
            let handler = Handler {
                options: options.clone(),
                state: state.clone(),
                forwards: forwards.clone(),
                registry: registry.clone(),
                directives: directives.subscribe(),
                shutdown: child.child_token(),
                peer: peer.to_string(),
            };
            async move {
                let Some(stream) = incoming.open().await else {
                    return;
                };
                match permit {
                    Some(permit) => {
                        let _permit = permit;
                        handler.run(stream).await;
                    }
                    None => {
                        handler.state.refused_full.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("tandem_proxy_refusals_total", "reason" => "max_probes")
                            .increment(1);
                        handler.refuse_full(stream).await;
                    }
                }
            }
        },
    )
    .await;
}

struct Handler {
    options: ProxyOptions,
    state: Arc<ProxyState>,
    forwards: mpsc::Sender<Forward>,
    registry: Arc<Registry>,
    directives: broadcast::Receiver<Directive>,
    shutdown: CancellationToken,
    peer: String,
}

type Conn = Framed<Stream, FrameCodec>;

/// The next answer for this probe; never, while it has no queue yet.
async fn recv_answer(answers: &mut Option<(u64, mpsc::Receiver<Message>)>) -> Option<Message> {
    match answers {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A framed probe link with small starting buffers: 10,000 idle probes should cost little,
/// and the buffers grow to the size of the batches a busy probe sends.
fn framed(stream: Stream, max_frame: usize) -> Conn {
    let mut parts =
        tokio_util::codec::FramedParts::new::<Message>(stream, FrameCodec::new(max_frame));
    parts.read_buf = bytes::BytesMut::with_capacity(512);
    parts.write_buf = bytes::BytesMut::with_capacity(256);
    Framed::from_parts(parts)
}

async fn send(conn: &mut Conn, msg: Message) -> Result<(), String> {
    conn.send(msg).await.map_err(|e| e.to_string())
}

impl Handler {
    async fn refuse_full(self, stream: Stream) {
        let mut conn = framed(stream, self.options.max_frame);
        let reject = Message::Reject {
            reason: RejectReason::Overloaded,
            message: format!(
                "{} holds its maximum of {} probe connections; use the other member of the pair or raise max_probes",
                self.options.name, self.options.max_probes
            ),
        };
        let _ = conn.send(&reject).await;
    }

    async fn run(mut self, stream: Stream) {
        let mut conn = framed(stream, self.options.max_frame);
        if !self.handshake(&mut conn).await {
            return;
        }
        self.state.probes.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("tandem_proxy_probes").increment(1.0);
        let mut answers = None;
        let result = self.serve(&mut conn, &mut answers).await;
        if let Some((id, _)) = answers {
            self.registry.unregister(id);
        }
        self.state.probes.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("tandem_proxy_probes").decrement(1.0);
        if let Err(e) = result {
            tracing::debug!(peer = %self.peer, error = %e, "probe connection closed");
        }
    }

    async fn handshake(&self, conn: &mut Conn) -> bool {
        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.next())
            .await
            .map(|frame| {
                frame.map(|frame| {
                    frame.map(|body| {
                        from_bytes::<Message>(&body)
                            .map_err(|error| tandem_protocol::BadFrame { error, batch: None })
                    })
                })
            });
        let answer = match check_hello(first, &self.options.name) {
            Ok(hello) => {
                let link = self.state.link();
                let redirect = self
                    .options
                    .redirect_to
                    .as_ref()
                    .filter(|_| link.up && link.failed_back && !link.acting_primary);
                if let Some(to) = redirect {
                    Message::Reject {
                        reason: RejectReason::Redirect { to: to.clone() },
                        message: format!(
                            "the pair has failed back to its primary: connect to {to}"
                        ),
                    }
                } else if link.up {
                    let welcome = Message::Welcome(Welcome {
                        version: PROTOCOL_VERSION,
                        name: self.options.name.clone(),
                        role: link.role,
                        acting_primary: link.acting_primary,
                        resynced: link.resynced,
                    });
                    tracing::debug!(peer = %self.peer, probe = %hello.name, "probe connected");
                    return conn.send(&welcome).await.is_ok();
                } else {
                    self.state
                        .refused_store_down
                        .fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("tandem_proxy_refusals_total", "reason" => "store_unavailable")
                        .increment(1);
                    Message::Reject {
                        reason: RejectReason::StoreUnavailable,
                        message: format!(
                            "{} cannot reach its store {}; use the other member of the pair",
                            self.options.name, self.options.store_name
                        ),
                    }
                }
            }
            Err(Some(reject)) => reject,
            Err(None) => return false,
        };
        let _ = conn.send(&answer).await;
        false
    }

    async fn serve(
        &mut self,
        conn: &mut Conn,
        // Registered at the first batch: an idle probe costs no answer queue.
        answers: &mut Option<(u64, mpsc::Receiver<Message>)>,
    ) -> Result<(), String> {
        let mut link = self.state.link.subscribe();
        let max_events = self.options.max_in_flight_per_probe;
        let mut in_flight: HashMap<u64, usize> = HashMap::new();
        let mut in_flight_events = 0usize;
        // A batch the upstream queue had no room for. While one waits the probe is not read
        // (backpressure), but its acknowledgements, directives and the store link's loss still
        // reach it: a full queue behind a hung store must not keep probes from being told to
        // leave.
        let mut waiting: Option<Forward> = None;
        // While the probe is not read, its heartbeats wait unread behind its batches, and a
        // commit slower than the probe's `dead_after` would look like a dead link and fail it
        // over. A Pong each heartbeat tells it the link and the store behind it are alive (the
        // store link has its own heartbeat; losing it still sends `Leave`).
        let mut keepalive =
            tokio::time::interval(self.options.heartbeat.max(Duration::from_millis(10)));
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = waiting.is_none()
                && in_flight_events < max_events
                && in_flight.len() < MAX_BATCHES_PER_PROBE;
            tokio::select! {
                permit = self.forwards.reserve(), if waiting.is_some() => {
                    let Ok(permit) = permit else { return Ok(()) };
                    if let Some(forward) = waiting.take() {
                        permit.send(forward);
                    }
                }
                frame = conn.next(), if room => {
                    let body = match frame {
                        None => return Ok(()),
                        Some(Err(e)) => {
                            let _ = conn.send(&Message::Error { message: e.to_string() }).await;
                            return Err(e.to_string());
                        }
                        Some(Ok(body)) => body,
                    };
                    if let Some(head) = events_head(&body) {
                        let n = usize::try_from(head.events).unwrap_or(usize::MAX);
                        if n > max_events {
                            let reason = format!(
                                "a batch of {n} events is over {}'s max_in_flight_per_probe of {max_events}: send smaller batches",
                                self.options.name
                            );
                            send(conn, Message::Refused { batch: head.batch, index: 0, reason }).await?;
                            continue;
                        }
                        in_flight_events += n;
                        in_flight.insert(head.batch, n);
                        let id = match answers {
                            Some((id, _)) => *id,
                            None => {
                                let (id, rx) = self.registry.register(MAX_BATCHES_PER_PROBE + 16);
                                *answers = Some((id, rx));
                                id
                            }
                        };
                        let forward = Forward { probe: id, head, frame: body };
                        match self.forwards.try_send(forward) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(forward)) => waiting = Some(forward),
                            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                        }
                        continue;
                    }
                    let msg = match from_bytes::<Message>(&body) {
                        Ok(msg) => msg,
                        Err(e) => {
                            self.state.refused_bad.fetch_add(1, Ordering::Relaxed);
                            let answer = match peek_batch(&body) {
                                Some(batch) => Message::Refused { batch, index: 0, reason: e.to_string() },
                                None => Message::Error { message: format!("frame does not decode as a tandem message: {e}") },
                            };
                            send(conn, answer).await?;
                            continue;
                        }
                    };
                    match msg {
                        Message::Ping { nonce } => send(conn, Message::Pong { nonce }).await?,
                        other => {
                            let message = format!(
                                "{} is not something a proxy forwards; operators talk to the stores directly",
                                other.name()
                            );
                            send(conn, Message::Error { message }).await?;
                        }
                    }
                }
                answer = recv_answer(answers) => {
                    let Some(answer) = answer else { return Ok(()) };
                    if let Message::Ack { batch, .. } | Message::Refused { batch, .. } = &answer {
                        in_flight_events -= in_flight.remove(batch).unwrap_or(0);
                    }
                    send(conn, answer).await?;
                }
                directive = self.directives.recv() => {
                    match directive {
                        Ok(d) => send(conn, Message::Directive(d)).await?,
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    }
                }
                changed = link.changed() => {
                    let down = changed.is_err() || !link.borrow_and_update().up;
                    if down {
                        let reason = format!(
                            "{} lost its store {}; fail over to the other member of the pair",
                            self.options.name, self.options.store_name
                        );
                        let _ = send(conn, Message::Directive(Directive::Leave { reason })).await;
                        return Ok(());
                    }
                }
                _ = keepalive.tick(), if !room => {
                    send(conn, Message::Pong { nonce: 0 }).await?;
                }
                _ = self.shutdown.cancelled() => return Ok(()),
            }
        }
    }
}
