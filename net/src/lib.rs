//! Link plumbing shared by the components: the accept loop, the handshake check and TLS
//! ([`tls`]).
//!
//! The accept loop follows mini-redis's listener: a semaphore caps connections, accept errors
//! (out of file descriptors, say) back off instead of spinning, every handler is a task in a
//! `JoinSet` that is reaped as it finishes and joined at shutdown, so none outlives the server.

#![forbid(unsafe_code)]

pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_protocol::{BadFrame, CodecError, Hello, Message, PROTOCOL_VERSION, RejectReason};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long a new connection may take to say Hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What to do with a connection past the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// Stop accepting until a connection ends (the kernel's backlog holds the rest).
    Wait,
    /// Accept it and hand it to the handler without a permit, so it can refuse with a reason.
    Refuse,
}

/// A connection just accepted, before its TLS handshake.
pub struct Incoming {
    tcp: TcpStream,
    tls: Option<Arc<tls::ServerTls>>,
    pub peer: SocketAddr,
}

impl Incoming {
    /// Completes the TLS handshake (on a TLS port) in the connection's own task, so a slow
    /// client never holds up the accept loop. `None`: refused, and logged.
    pub async fn open(self) -> Option<tls::Stream> {
        tls::accept(self.tcp, self.tls.as_deref(), self.peer).await
    }
}

/// Accepts connections until `shutdown`, running `handle` for each as a task.
///
/// `handle` gets the connection, the peer and the connection's permit (`None`: over the cap,
/// in [`WhenFull::Refuse`] mode). Handlers get a child of `shutdown`; all are joined before
/// this returns.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    tls: Option<Arc<tls::ServerTls>>,
    max_connections: usize,
    when_full: WhenFull,
    shutdown: CancellationToken,
    mut handle: F,
) where
    F: FnMut(Incoming, SocketAddr, Option<OwnedSemaphorePermit>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max_connections));
    let mut handlers = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let waited = match when_full {
            WhenFull::Wait => tokio::select! {
                permit = limit.clone().acquire_owned() => match permit {
                    Ok(permit) => Some(permit),
                    Err(_) => break,
                },
                _ = shutdown.cancelled() => break,
            },
            WhenFull::Refuse => None,
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
                tracing::warn!(error = %e, "accept failed; backing off {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let permit = waited.or_else(|| limit.clone().try_acquire_owned().ok());
        let incoming = Incoming {
            tcp: stream,
            tls: tls.clone(),
            peer,
        };
        handlers.spawn(handle(incoming, peer, permit));
        // Reap finished handlers so the set does not grow with every connection ever made.
        while handlers.try_join_next().is_some() {}
    }
    shutdown.cancel();
    while handlers.join_next().await.is_some() {}
}

/// What the first frame of a connection decoded to (or the timeout).
pub type FirstFrame =
    Result<Option<Result<Result<Message, BadFrame>, CodecError>>, tokio::time::error::Elapsed>;

/// Checks the first frame of a connection: the client's `Hello`, or the `Reject` to send it
/// (`None` when the peer just went away).
pub fn check_hello(first: FirstFrame, server: &str) -> Result<Hello, Option<Message>> {
    let reject = |reason, message: String| Err(Some(Message::Reject { reason, message }));
    match first {
        Ok(Some(Ok(Ok(Message::Hello(hello))))) if hello.version != PROTOCOL_VERSION => reject(
            RejectReason::UnsupportedVersion {
                supported: PROTOCOL_VERSION,
            },
            format!(
                "protocol version {} is not supported; {server} speaks {PROTOCOL_VERSION}",
                hello.version
            ),
        ),
        Ok(Some(Ok(Ok(Message::Hello(hello))))) => Ok(hello),
        Ok(Some(Ok(Ok(other)))) => reject(
            RejectReason::BadRequest,
            format!("expected Hello as the first message, got {}", other.name()),
        ),
        Ok(Some(Ok(Err(bad)))) => reject(
            RejectReason::BadRequest,
            format!("the first frame is not a tandem Hello: {bad}"),
        ),
        Ok(Some(Err(e))) => reject(RejectReason::BadRequest, e.to_string()),
        Ok(None) => Err(None),
        Err(_) => reject(
            RejectReason::BadRequest,
            format!("no Hello within {HANDSHAKE_TIMEOUT:?}"),
        ),
    }
}
