//! The virtual-pair client: the tokio driver around the failover machine and the spool.
//!
//! A [`PairClient`] owns one task. Events handed to it are numbered and spooled (durably, with
//! a disk spool) before anything is sent; the task sends spooled events in batches over the
//! current link, forgets them when acknowledged, and after every new link resends everything
//! still unacknowledged, to whichever member it reached (the stores deduplicate). Links are
//! split so that reading never waits for writing. Connection attempts and polls of the primary
//! run as their own tasks and report back, so the driver never blocks on the network.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tandem_protocol::codec::max_event;
use tandem_protocol::{ClientKind, Directive, EventBody, EventsFrame, Message, RejectReason};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::connection::{ClientError, Connection};
use crate::failover::{Action, Failover, Input, Member, Settings};
use crate::spool::{Batch, Spool, SpoolError};

/// Where the pair is and how to behave.
#[derive(Clone, Debug)]
pub struct PairConfig {
    /// This probe instance's name, sent in the handshake.
    pub client_name: String,
    pub primary: (String, SocketAddr),
    pub backup: (String, SocketAddr),
    pub max_frame: usize,
    pub failover: Settings,
    /// Go back to the primary on polls only once its store reports a finished resync.
    pub require_resync: bool,
    pub batch_events: usize,
    pub max_in_flight: usize,
    pub connect_timeout: Duration,
    /// TLS to the pair's members (None: plaintext).
    pub tls: Option<std::sync::Arc<tandem_net::tls::ClientTls>>,
}

/// What the client has done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub acked: u64,
    pub rejected: u64,
    /// Distinct refusal reasons with how many events each refused.
    pub rejections: Vec<(String, u64)>,
    pub failovers: u64,
    /// The longest time events waited with no acknowledgement arriving.
    pub max_ack_gap: Duration,
    /// Events spooled and not yet acknowledged.
    pub pending: u64,
    pub member: Option<Member>,
    /// Set when the client stopped for good.
    pub gave_up: Option<String>,
}

/// Why the client failed.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("gave up: {0}")]
    GaveUp(String),
    #[error("{pending} events were not acknowledged within {after:?}")]
    Timeout { pending: u64, after: Duration },
    #[error("the pair client has stopped")]
    Stopped,
}

enum Cmd {
    Push {
        time: i64,
        bodies: Bodies,
        cursor: Option<Vec<u8>>,
        done: oneshot::Sender<Result<(), PairError>>,
    },
}

/// Events handed to the client: the caller's own, or a range of a list it shares (a load
/// generator pushes the same alerts over and over, and copying each one was a tenth of its
/// CPU). Either way the spool encodes them and keeps only the encoding.
enum Bodies {
    Owned(Vec<EventBody>),
    Shared(std::sync::Arc<[EventBody]>, std::ops::Range<usize>),
}

impl AsRef<[EventBody]> for Bodies {
    fn as_ref(&self) -> &[EventBody] {
        match self {
            Bodies::Owned(bodies) => bodies,
            Bodies::Shared(list, range) => list.get(range.clone()).unwrap_or_default(),
        }
    }
}

/// Sends events to the virtual pair; see the module documentation.
pub struct PairClient {
    cmds: mpsc::Sender<Cmd>,
    stats: watch::Receiver<Stats>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl PairClient {
    pub fn start(config: PairConfig, mut spool: Spool) -> PairClient {
        spool.set_max_event(max_event(config.max_frame));
        let (cmds, rx) = mpsc::channel(64);
        let pending = spool.len() as u64;
        let (stats_tx, stats) = watch::channel(Stats {
            pending,
            ..Stats::default()
        });
        let shutdown = CancellationToken::new();
        let driver = Driver::new(config, spool, stats_tx);
        let task = tokio::spawn(driver.run(rx, shutdown.clone()));
        PairClient {
            cmds,
            stats,
            shutdown,
            task,
        }
    }

    /// Spools `bodies` (durably, with a disk spool) for sending; returns once they are safe,
    /// not once they are acknowledged. `cursor` records how far the source has been read.
    pub async fn push(
        &self,
        time: i64,
        bodies: Vec<EventBody>,
        cursor: Option<Vec<u8>>,
    ) -> Result<(), PairError> {
        self.send_push(time, Bodies::Owned(bodies), cursor).await
    }

    /// [`PairClient::push`] for the events `list[range]`, without copying them (a range past
    /// the list's end is cut at the end).
    pub async fn push_shared(
        &self,
        time: i64,
        list: std::sync::Arc<[EventBody]>,
        range: std::ops::Range<usize>,
    ) -> Result<(), PairError> {
        let end = range.end.min(list.len());
        let range = range.start.min(end)..end;
        self.send_push(time, Bodies::Shared(list, range), None)
            .await
    }

    async fn send_push(
        &self,
        time: i64,
        bodies: Bodies,
        cursor: Option<Vec<u8>>,
    ) -> Result<(), PairError> {
        let (done, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Push {
                time,
                bodies,
                cursor,
                done,
            })
            .await
            .map_err(|_| self.stopped())?;
        rx.await.map_err(|_| self.stopped())?
    }

    fn stopped(&self) -> PairError {
        match self.stats.borrow().gave_up.clone() {
            Some(reason) => PairError::GaveUp(reason),
            None => PairError::Stopped,
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats.borrow().clone()
    }

    /// A receiver that wakes whenever the stats change: to follow acknowledgements as they
    /// arrive without polling.
    pub fn watch(&self) -> watch::Receiver<Stats> {
        self.stats.clone()
    }

    /// Waits until every spooled event is acknowledged (or refused), at most `timeout`.
    pub async fn wait_acked(&mut self, timeout: Duration) -> Result<Stats, PairError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let stats = self.stats.borrow_and_update();
                if let Some(reason) = &stats.gave_up {
                    return Err(PairError::GaveUp(reason.clone()));
                }
                if stats.pending == 0 {
                    return Ok(stats.clone());
                }
            }
            match tokio::time::timeout_at(deadline, self.stats.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(self.stopped()),
                Err(_) => {
                    return Err(PairError::Timeout {
                        pending: self.stats.borrow().pending,
                        after: timeout,
                    });
                }
            }
        }
    }

    /// Stops the client; unacknowledged events stay in a disk spool for the next run.
    pub async fn close(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// What the helper tasks report to the driver.
enum Report {
    Connected {
        attempt: u64,
        member: Member,
        /// Boxed: a connection is several times the size of the messages that make up
        /// almost every report.
        result: Result<Box<Connection>, ClientError>,
    },
    Message {
        link: u64,
        message: Message,
    },
    Closed {
        link: u64,
        reason: String,
    },
    Polled {
        good: bool,
    },
}

/// What the writer task of a link sends.
enum Outgoing {
    Message(Message),
    /// An event batch, its events already encoded.
    Frame(EventsFrame),
}

/// The current link: its id, the member and its writer queue; its tasks die with it.
struct Link {
    id: u64,
    member: Member,
    writer: mpsc::Sender<Outgoing>,
    tasks: Vec<AbortHandle>,
}

impl Drop for Link {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Driver {
    config: PairConfig,
    spool: Spool,
    failover: Failover,
    stats: Stats,
    stats_tx: watch::Sender<Stats>,
    link: Option<Link>,
    next_id: u64,
    attempt: u64,
    /// Batches sent on the current link, and the highest seq sent on it.
    in_flight: HashMap<u64, Vec<u64>>,
    in_flight_events: usize,
    sent_upto: u64,
    /// When the oldest unacknowledged wait began (the last acknowledgement, or the moment the
    /// spool stopped being empty).
    waiting_since: Option<Instant>,
    reports: mpsc::Sender<Report>,
    reports_rx: Option<mpsc::Receiver<Report>>,
    tasks: JoinSet<()>,
}

impl Driver {
    /// A connection attempt to `addr` as the probe `name`, to run in its own task.
    fn dial(
        &self,
        addr: SocketAddr,
        name: String,
    ) -> impl std::future::Future<Output = Result<Connection, ClientError>> + Send + 'static {
        let (max_frame, timeout, tls) = (
            self.config.max_frame,
            self.config.connect_timeout,
            self.config.tls.clone(),
        );
        async move {
            Connection::connect_tls(
                addr,
                ClientKind::Probe,
                &name,
                max_frame,
                timeout,
                tls.as_deref(),
            )
            .await
        }
    }
}

fn fatal_reason(e: &ClientError) -> Option<String> {
    match e {
        ClientError::Rejected {
            reason: RejectReason::UnsupportedVersion { .. } | RejectReason::NotAuthorised,
            message,
            ..
        } => Some(message.clone()),
        ClientError::Tls {
            certificate: true,
            message,
            ..
        } => Some(message.clone()),
        _ => None,
    }
}

impl Driver {
    fn new(config: PairConfig, spool: Spool, stats_tx: watch::Sender<Stats>) -> Driver {
        let (reports, reports_rx) = mpsc::channel(1024);
        let waiting_since = (!spool.is_empty()).then(Instant::now);
        Driver {
            failover: Failover::new(config.failover.clone()),
            config,
            stats: Stats {
                pending: spool.len() as u64,
                ..Stats::default()
            },
            spool,
            stats_tx,
            link: None,
            next_id: 0,
            attempt: 0,
            in_flight: HashMap::new(),
            in_flight_events: 0,
            sent_upto: 0,
            waiting_since,
            reports,
            reports_rx: Some(reports_rx),
            tasks: JoinSet::new(),
        }
    }

    fn addr(&self, member: Member) -> SocketAddr {
        match member {
            Member::Primary => self.config.primary.1,
            Member::Backup => self.config.backup.1,
        }
    }

    fn member_named(&self, name: &str) -> Option<Member> {
        if name == self.config.primary.0 {
            Some(Member::Primary)
        } else if name == self.config.backup.0 {
            Some(Member::Backup)
        } else {
            None
        }
    }

    async fn run(mut self, mut cmds: mpsc::Receiver<Cmd>, shutdown: CancellationToken) {
        let Some(mut reports) = self.reports_rx.take() else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(25));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let actions = self.failover.handle(Input::Start, Instant::now());
        let mut running = self.perform(actions);
        while running {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Push { time, bodies, cursor, done }) => {
                        let result = self.push(time, bodies, cursor.as_deref());
                        // Published before the caller hears back: once `push` returns, `stats`
                        // and `wait_acked` must count these events as pending, or a caller
                        // could see "nothing pending" and stop before they were delivered.
                        self.publish();
                        let _ = done.send(result);
                        self.send_more();
                    }
                    None => break,
                },
                Some(report) = reports.recv() => {
                    running = self.on_report(report);
                }
                _ = tick.tick() => {
                    let actions = self.failover.handle(Input::Tick, Instant::now());
                    running = self.perform(actions);
                    self.track_gap();
                }
                _ = shutdown.cancelled() => break,
            }
            self.publish();
        }
        self.link = None;
        self.tasks.shutdown().await;
        self.publish();
    }

    fn push(&mut self, time: i64, bodies: Bodies, cursor: Option<&[u8]>) -> Result<(), PairError> {
        let was_empty = self.spool.is_empty();
        self.spool.push_from(time, bodies, cursor)?;
        if was_empty && !self.spool.is_empty() {
            self.waiting_since = Some(Instant::now());
        }
        Ok(())
    }

    fn track_gap(&mut self) {
        if let Some(since) = self.waiting_since {
            self.stats.max_ack_gap = self.stats.max_ack_gap.max(since.elapsed());
        }
    }

    fn publish(&mut self) {
        self.stats.pending = self.spool.len() as u64;
        self.stats.failovers = self.failover.failovers();
        self.stats.member = self.link.as_ref().map(|l| l.member);
        let stats = self.stats.clone();
        self.stats_tx.send_if_modified(|old| {
            if *old == stats {
                false
            } else {
                *old = stats;
                true
            }
        });
    }

    /// Returns false when the client must stop.
    fn on_report(&mut self, report: Report) -> bool {
        let now = Instant::now();
        match report {
            Report::Connected {
                attempt,
                member,
                result,
            } => {
                if attempt != self.attempt {
                    return true;
                }
                let expected = match member {
                    Member::Primary => &self.config.primary.0,
                    Member::Backup => &self.config.backup.0,
                };
                let result = result.and_then(|conn| {
                    if conn.welcome.name == *expected {
                        Ok(conn)
                    } else {
                        // Another server on that address (a stale pair file, a port reused):
                        // sending there would put events where nobody looks for them.
                        tracing::warn!(
                            expected = %expected,
                            answered = %conn.welcome.name,
                            addr = %conn.addr(),
                            "the wrong server answered; check the pair file"
                        );
                        Err(ClientError::Handshake {
                            addr: conn.addr(),
                            got: "a Welcome from another server",
                        })
                    }
                });
                match result {
                    Ok(conn) => {
                        tracing::debug!(?member, unacked = self.spool.len(), "connected");
                        self.open_link(member, *conn);
                        let actions = self.failover.handle(Input::Connected(member), now);
                        self.perform(actions)
                    }
                    Err(e) => {
                        let fatal = fatal_reason(&e);
                        tracing::debug!(error = %e, "connect failed");
                        let actions = self
                            .failover
                            .handle(Input::ConnectFailed { member, fatal }, now);
                        self.perform(actions)
                    }
                }
            }
            Report::Message { link, message } => {
                if self.link.as_ref().map(|l| l.id) != Some(link) {
                    return true;
                }
                self.failover.handle(Input::Heard, now);
                let input = match message {
                    Message::Ack { batch, .. } => {
                        self.settle(batch, None);
                        None
                    }
                    Message::Refused { batch, reason, .. } => {
                        self.settle(batch, Some(reason));
                        None
                    }
                    Message::Directive(Directive::Failback) => Some(Input::Failback),
                    Message::Directive(Directive::Leave { reason }) => {
                        tracing::info!("told to leave: {reason}");
                        Some(Input::Leave)
                    }
                    Message::Directive(Directive::Redirect { to }) => {
                        self.member_named(&to).map(Input::Redirect)
                    }
                    Message::Error { message } => {
                        tracing::warn!("the pair said: {message}");
                        None
                    }
                    _ => None,
                };
                match input {
                    Some(input) => {
                        let actions = self.failover.handle(input, now);
                        self.perform(actions)
                    }
                    None => {
                        self.send_more();
                        true
                    }
                }
            }
            Report::Closed { link, reason } => {
                if self.link.as_ref().map(|l| l.id) != Some(link) {
                    return true;
                }
                tracing::debug!("link closed: {reason}");
                let actions = self.failover.handle(Input::LinkLost, now);
                self.perform(actions)
            }
            Report::Polled { good } => {
                let actions = self.failover.handle(Input::Polled { good }, now);
                self.perform(actions)
            }
        }
    }

    /// An answer for a batch: forget its events (acknowledged, or refused for good).
    fn settle(&mut self, batch: u64, refused: Option<String>) {
        let Some(seqs) = self.in_flight.remove(&batch) else {
            return;
        };
        self.in_flight_events -= seqs.len();
        let n = seqs.len() as u64;
        tracing::trace!(batch, events = n, "acknowledged");
        if let Err(e) = self.spool.ack(&seqs) {
            tracing::warn!(error = %e, "could not forget acknowledged events; they will be resent");
        }
        match refused {
            None => self.stats.acked += n,
            Some(reason) => {
                tracing::warn!(events = n, "refused: {reason}");
                self.stats.rejected += n;
                match self.stats.rejections.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, count)) => *count += n,
                    None => self.stats.rejections.push((reason, n)),
                }
            }
        }
        self.track_gap();
        self.waiting_since = (!self.spool.is_empty()).then(Instant::now);
    }

    fn open_link(&mut self, member: Member, conn: Connection) {
        self.next_id += 1;
        let id = self.next_id;
        let (mut reader, mut writer) = conn.split();
        let (tx, mut rx) = mpsc::channel::<Outgoing>(64);
        let reports = self.reports.clone();
        let read = self.tasks.spawn(async move {
            loop {
                match reader.recv().await {
                    Ok(message) => {
                        if reports
                            .send(Report::Message { link: id, message })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = reports
                            .send(Report::Closed {
                                link: id,
                                reason: e.to_string(),
                            })
                            .await;
                        return;
                    }
                }
            }
        });
        let reports = self.reports.clone();
        let write = self.tasks.spawn(async move {
            while let Some(out) = rx.recv().await {
                let sent = match out {
                    Outgoing::Message(msg) => writer.send(&msg).await,
                    Outgoing::Frame(frame) => writer.send_events(frame).await,
                };
                if let Err(e) = sent {
                    let _ = reports
                        .send(Report::Closed {
                            link: id,
                            reason: e.to_string(),
                        })
                        .await;
                    return;
                }
            }
        });
        self.link = Some(Link {
            id,
            member,
            writer: tx,
            tasks: vec![read, write],
        });
    }

    /// Returns false when the client must stop.
    fn perform(&mut self, actions: Vec<Action>) -> bool {
        for action in actions {
            match action {
                Action::Connect(member) => {
                    self.attempt += 1;
                    let attempt = self.attempt;
                    let connect = self.dial(self.addr(member), self.config.client_name.clone());
                    let reports = self.reports.clone();
                    self.tasks.spawn(async move {
                        let result = connect.await.map(Box::new);
                        let _ = reports
                            .send(Report::Connected {
                                attempt,
                                member,
                                result,
                            })
                            .await;
                    });
                }
                Action::Disconnect => {
                    self.link = None;
                    self.in_flight.clear();
                    self.in_flight_events = 0;
                    self.sent_upto = 0;
                }
                Action::SendPing => {
                    if let Some(link) = &self.link {
                        let _ = link
                            .writer
                            .try_send(Outgoing::Message(Message::Ping { nonce: 0 }));
                    }
                }
                Action::PollPrimary => {
                    let name = format!("{}/poll", self.config.client_name);
                    let connect = self.dial(self.config.primary.1, name);
                    let require_resync = self.config.require_resync;
                    let reports = self.reports.clone();
                    self.tasks.spawn(async move {
                        let good = match connect.await {
                            Ok(conn) => {
                                conn.welcome.acting_primary
                                    && (conn.welcome.resynced || !require_resync)
                            }
                            Err(_) => false,
                        };
                        let _ = reports.send(Report::Polled { good }).await;
                    });
                }
                Action::ResendUnacked => {
                    self.in_flight.clear();
                    self.in_flight_events = 0;
                    self.sent_upto = 0;
                    self.send_more();
                }
                Action::GiveUp(reason) => {
                    tracing::error!("giving up: {reason}");
                    self.stats.gave_up = Some(reason);
                    return false;
                }
            }
        }
        true
    }

    /// Sends spooled events the current link has not had, within the in-flight limit.
    fn send_more(&mut self) {
        while self.in_flight_events < self.config.max_in_flight
            && self
                .link
                .as_ref()
                .is_some_and(|link| link.writer.capacity() > 0)
        {
            let room =
                (self.config.max_in_flight - self.in_flight_events).min(self.config.batch_events);
            let batch = self.next_id + 1;
            // The spool's encodings, one after the other: no event is encoded again.
            // Bounded by bytes too: a thousand events of large alerts are over the largest
            // frame, and a batch that cannot be encoded would be tried again for ever.
            let max_bytes = max_event(self.config.max_frame);
            let Some(Batch { frame, seqs }) =
                self.spool
                    .batch_frame(self.sent_upto, room, max_bytes, batch)
            else {
                return;
            };
            let Some(&last) = seqs.last() else { return };
            // A lone event over the limit was spooled before the limit was what it is now (a
            // lower max_frame_bytes, an older version): it can never be sent, so it is given up
            // as refused rather than tried for ever, holding back every event after it.
            let too_large = match &frame {
                EventsFrame::Encoded { events, .. } if events.len() == 1 => events
                    .first()
                    .map(|e| e.len())
                    .filter(|&len| len > max_bytes),
                _ => None,
            };
            self.next_id = batch;
            if let Some(len) = too_large {
                self.sent_upto = last;
                self.in_flight_events += seqs.len();
                self.in_flight.insert(batch, seqs);
                self.settle(
                    batch,
                    Some(format!(
                        "an event of {len} bytes is over the {max_bytes} bytes the pair can carry"
                    )),
                );
                continue;
            }
            let Some(link) = &self.link else { return };
            if link.writer.try_send(Outgoing::Frame(frame)).is_err() {
                return;
            }
            self.sent_upto = last;
            self.in_flight_events += seqs.len();
            self.in_flight.insert(batch, seqs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable_pair() -> PairConfig {
        // Ports nothing listens on: bound, read, and released again.
        let closed = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        PairConfig {
            client_name: "t".into(),
            primary: ("P".into(), closed()),
            backup: ("B".into(), closed()),
            max_frame: tandem_protocol::DEFAULT_MAX_FRAME,
            failover: Settings::default(),
            require_resync: false,
            batch_events: 10,
            max_in_flight: 100,
            connect_timeout: Duration::from_millis(100),
            tls: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pushed_event_is_pending_as_soon_as_push_returns() {
        for _ in 0..50 {
            let mut client = PairClient::start(unreachable_pair(), Spool::open(None, "t").unwrap());
            let body = EventBody::Expire {
                identifier: "x".into(),
            };
            client.push(1, vec![body], None).await.unwrap();
            assert_eq!(client.stats().pending, 1);
            match client.wait_acked(Duration::from_millis(50)).await {
                Err(PairError::Timeout { pending: 1, .. }) => {}
                other => panic!("an undelivered event must not count as acknowledged: {other:?}"),
            }
            client.close().await;
        }
    }
}
