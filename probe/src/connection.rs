//! One link to a tandem server: connect, handshake, then send and receive messages.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tandem_net::tls::{ClientTls, Stream};
use tandem_protocol::codec::{from_bytes, is_pong};
use tandem_protocol::{
    ClientKind, CodecError, FrameCodec, Hello, MergeFrame, Message, MessageCodec, PROTOCOL_VERSION,
    RejectReason, ReplicateFrame, Welcome,
};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, FramedRead, FramedWrite};

/// Why a link failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} refused the connection ({reason:?}): {message}")]
    Rejected {
        addr: SocketAddr,
        reason: RejectReason,
        message: String,
    },
    #[error("{addr} closed the connection")]
    Closed { addr: SocketAddr },
    #[error("{addr} sent a frame that does not decode: {message}")]
    BadFrame { addr: SocketAddr, message: String },
    #[error("{addr}: {source}")]
    Codec {
        addr: SocketAddr,
        #[source]
        source: CodecError,
    },
    #[error("{addr} did not answer within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("{addr} answered the handshake with {got} instead of Welcome")]
    Handshake { addr: SocketAddr, got: &'static str },
    /// The TLS handshake failed; `certificate`: because of a certificate, which retrying
    /// will not fix.
    #[error("{message}")]
    Tls {
        addr: SocketAddr,
        message: String,
        certificate: bool,
    },
}

impl ClientError {
    /// A certificate problem: the other member will likely refuse too, and retrying will not
    /// help until a certificate changes.
    pub fn is_certificate(&self) -> bool {
        matches!(
            self,
            ClientError::Tls {
                certificate: true,
                ..
            }
        )
    }
}

type Item = Option<Result<Result<Message, tandem_protocol::BadFrame>, CodecError>>;

/// What a read from the framed stream means to a client.
fn received(addr: SocketAddr, item: Item) -> Result<Message, ClientError> {
    match item {
        None => Err(ClientError::Closed { addr }),
        Some(Err(source)) => Err(ClientError::Codec { addr, source }),
        Some(Ok(Err(bad))) => Err(ClientError::BadFrame {
            addr,
            message: bad.to_string(),
        }),
        Some(Ok(Ok(msg))) => Ok(msg),
    }
}

/// Under TLS 1.3 a server refuses a client certificate after the client's handshake has
/// completed: the refusal arrives as the first read's error. Names it as the TLS problem it is.
fn tls_refusal(addr: SocketAddr, source: CodecError) -> ClientError {
    if let CodecError::Io(e) = &source {
        if let Some(message) = tandem_net::tls::refusal(e, addr) {
            return ClientError::Tls {
                addr,
                message,
                certificate: true,
            };
        }
    }
    ClientError::Codec { addr, source }
}

pub struct Connection {
    // Frames, decoded in `recv`: a caller may take a frame undecoded (`request_frame`).
    framed: Framed<Stream, FrameCodec>,
    addr: SocketAddr,
    pub welcome: Welcome,
}

impl Connection {
    /// Connects in plaintext and handshakes, giving up after `timeout`.
    pub async fn connect(
        addr: SocketAddr,
        kind: ClientKind,
        name: &str,
        max_frame: usize,
        timeout: Duration,
    ) -> Result<Connection, ClientError> {
        Self::connect_tls(addr, kind, name, max_frame, timeout, None).await
    }

    /// Connects (over TLS when `tls` is set, verifying the pair's name) and handshakes,
    /// giving up after `timeout`.
    pub async fn connect_tls(
        addr: SocketAddr,
        kind: ClientKind,
        name: &str,
        max_frame: usize,
        timeout: Duration,
        tls: Option<&ClientTls>,
    ) -> Result<Connection, ClientError> {
        let attempt = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|source| ClientError::Connect { addr, source })?;
            let _ = tcp.set_nodelay(true);
            let stream = tandem_net::tls::connect(tcp, tls, addr)
                .await
                .map_err(|e| ClientError::Tls {
                    addr,
                    message: e.message,
                    certificate: e.certificate,
                })?;
            let mut framed = Framed::new(stream, FrameCodec::new(max_frame));
            let hello = Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                kind,
                name: name.to_string(),
            });
            framed
                .send(&hello)
                .await
                .map_err(|source| tls_refusal(addr, source))?;
            let mut conn = Connection {
                framed,
                addr,
                welcome: Welcome {
                    version: 0,
                    name: String::new(),
                    role: tandem_protocol::Role::Primary,
                    acting_primary: false,
                    resynced: false,
                },
            };
            let first = match conn.recv().await {
                Err(ClientError::Codec { addr, source }) => Err(tls_refusal(addr, source)),
                other => other,
            };
            match first? {
                Message::Welcome(welcome) => {
                    conn.welcome = welcome;
                    Ok(conn)
                }
                Message::Reject { reason, message } => Err(ClientError::Rejected {
                    addr,
                    reason,
                    message,
                }),
                other => Err(ClientError::Handshake {
                    addr,
                    got: other.name(),
                }),
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| ClientError::Timeout {
                addr,
                after: timeout,
            })?
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn send(&mut self, msg: &Message) -> Result<(), ClientError> {
        let addr = self.addr;
        self.framed
            .send(msg)
            .await
            .map_err(|source| ClientError::Codec { addr, source })
    }

    /// Sends `body` as one frame as it is, unchecked: for tests of how servers treat frames no
    /// tandem encoder would produce.
    pub async fn send_raw_frame(&mut self, body: &[u8]) -> Result<(), ClientError> {
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend_from_slice(body);
        self.write_raw(&bytes).await
    }

    /// Sends a bare length prefix, announcing a frame of `len` bytes (for tests).
    pub async fn send_raw_length(&mut self, len: u32) -> Result<(), ClientError> {
        self.write_raw(&len.to_be_bytes()).await
    }

    async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        use tokio::io::AsyncWriteExt;
        let addr = self.addr;
        let stream = self.framed.get_mut();
        stream
            .write_all(bytes)
            .await
            .and(stream.flush().await)
            .map_err(|e| ClientError::Codec {
                addr,
                source: CodecError::Io(e),
            })
    }

    /// The next message; a frame that does not decode is an error.
    pub async fn recv(&mut self) -> Result<Message, ClientError> {
        let frame = self.recv_frame().await?;
        tandem_protocol::codec::decode_frame(frame).map_err(|e| ClientError::BadFrame {
            addr: self.addr,
            message: e.to_string(),
        })
    }

    /// The next frame, undecoded.
    pub async fn recv_frame(&mut self) -> Result<BytesMut, ClientError> {
        let addr = self.addr;
        match self.framed.next().await {
            None => Err(ClientError::Closed { addr }),
            Some(Err(source)) => Err(ClientError::Codec { addr, source }),
            Some(Ok(frame)) => Ok(frame),
        }
    }

    /// Sends a `Merge` frame (a gateway passing a snapshot page on): its head and the page
    /// go to the socket in one vectored write, the page from where it lies, never copied into
    /// the write buffer (that copy was 2 % of a full resync's CPU).
    pub async fn send_merge(&mut self, merge: MergeFrame<'_>) -> Result<(), ClientError> {
        let split = merge.split(self.framed.codec().max_frame());
        self.send_split(split).await
    }

    /// Sends a `Replicate` frame (a gateway passing a page of the log on) the same way.
    pub async fn send_replicate(
        &mut self,
        replicate: ReplicateFrame<'_>,
    ) -> Result<(), ClientError> {
        let split = replicate.split(self.framed.codec().max_frame());
        self.send_split(split).await
    }

    /// Writes a frame's head and the page that ends it in one vectored write.
    async fn send_split(
        &mut self,
        split: Result<(bytes::BytesMut, &[u8]), CodecError>,
    ) -> Result<(), ClientError> {
        let addr = self.addr;
        let (head, page) = split.map_err(|source| ClientError::Codec { addr, source })?;
        // Whatever was framed before goes first.
        SinkExt::<&Message>::flush(&mut self.framed)
            .await
            .map_err(|source| ClientError::Codec { addr, source })?;
        write_split(self.framed.get_mut(), head, page, addr).await
    }

    /// Splits the link so that reading never waits for writing: a peer that is itself
    /// blocked writing to us can then always make progress.
    pub fn split(self) -> (Reader, Writer) {
        let addr = self.addr;
        let parts = self.framed.into_parts();
        let codec_max = parts.codec.max_frame();
        let (read, write) = tokio::io::split(parts.io);
        let mut reader = FramedRead::new(read, MessageCodec::new(codec_max));
        // Bytes that arrived with the handshake belong to the reader.
        reader.read_buffer_mut().extend_from_slice(&parts.read_buf);
        let writer = FramedWrite::new(write, MessageCodec::new(codec_max));
        (
            Reader {
                inner: reader,
                addr,
            },
            Writer {
                inner: writer,
                addr,
            },
        )
    }

    /// Sends `msg` and waits up to `timeout` for its answer: the next message that is not the
    /// Pong of a heartbeat sent earlier on this connection (unless `msg` is itself a Ping).
    pub async fn request(
        &mut self,
        msg: &Message,
        timeout: Duration,
    ) -> Result<Message, ClientError> {
        let frame = self.request_frame(msg, timeout).await?;
        from_bytes(&frame).map_err(|e| ClientError::BadFrame {
            addr: self.addr,
            message: e.to_string(),
        })
    }

    /// [`Connection::request`], with the answer's frame undecoded: for a caller that passes
    /// it on (a snapshot page) or reads only its head.
    pub async fn request_frame(
        &mut self,
        msg: &Message,
        timeout: Duration,
    ) -> Result<BytesMut, ClientError> {
        self.send(msg).await?;
        let addr = self.addr;
        let pinged = matches!(msg, Message::Ping { .. });
        tokio::time::timeout(timeout, async {
            loop {
                let frame = self.recv_frame().await?;
                if pinged || !is_pong(&frame) {
                    return Ok(frame);
                }
            }
        })
        .await
        .map_err(|_| ClientError::Timeout {
            addr,
            after: timeout,
        })?
    }
}

/// The receiving half of a split link.
pub struct Reader {
    inner: FramedRead<ReadHalf<Stream>, MessageCodec>,
    addr: SocketAddr,
}

impl Reader {
    /// The next message; a frame that does not decode is an error.
    pub async fn recv(&mut self) -> Result<Message, ClientError> {
        received(self.addr, self.inner.next().await)
    }
}

/// The sending half of a split link.
pub struct Writer {
    inner: FramedWrite<WriteHalf<Stream>, MessageCodec>,
    addr: SocketAddr,
}

/// Writes a frame's head and the page that ends it to `stream` in one vectored write: the
/// page goes from where it lies, never copied into a write buffer.
async fn write_split<W: tokio::io::AsyncWrite + Unpin>(
    stream: &mut W,
    head: bytes::BytesMut,
    page: &[u8],
    addr: SocketAddr,
) -> Result<(), ClientError> {
    use bytes::Buf;
    use tokio::io::AsyncWriteExt;
    let mut parts = head.chain(page);
    stream
        .write_all_buf(&mut parts)
        .await
        .and(stream.flush().await)
        .map_err(|e| ClientError::Codec {
            addr,
            source: CodecError::Io(e),
        })
}

impl Writer {
    /// Sends an `Events` frame from its parts (a probe's spooled batch, or a proxy passing
    /// one on under its own batch id, which goes out without being copied).
    pub async fn send_events(
        &mut self,
        frame: tandem_protocol::EventsFrame,
    ) -> Result<(), ClientError> {
        let addr = self.addr;
        let Some(split) = frame.split(self.inner.encoder().max_frame()) else {
            return self
                .inner
                .send(frame)
                .await
                .map_err(|source| ClientError::Codec { addr, source });
        };
        let (head, page) = split.map_err(|source| ClientError::Codec { addr, source })?;
        // Whatever was framed before goes first.
        SinkExt::<&Message>::flush(&mut self.inner)
            .await
            .map_err(|source| ClientError::Codec { addr, source })?;
        write_split(self.inner.get_mut(), head, page, addr).await
    }

    pub async fn send(&mut self, msg: &Message) -> Result<(), ClientError> {
        let addr = self.addr;
        self.inner
            .send(msg)
            .await
            .map_err(|source| ClientError::Codec { addr, source })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}
