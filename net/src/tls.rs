//! TLS for every tandem link, verified against the virtual pair's name.
//!
//! Clients never verify the member they happen to reach by its own name: every member's
//! certificate carries the pair's name as a subject alternative name, and clients check that
//! name, so a failover never breaks verification (the seed design's problem). Certificates and
//! keys are read from PEM files and read again when they change on disk or on SIGHUP; each new
//! connection gets the configuration current at its start, and established ones keep theirs.
//!
//! Wrong setups get a one-line answer naming the peer on both sides: a plaintext client on a TLS
//! port is sent a plaintext `Reject` saying so, a TLS client on a plaintext port is sent one too
//! (its TLS library then reports a peer that does not speak TLS), and certificate problems are
//! named (untrusted, expired, wrong name, client certificate refused).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tandem_protocol::{Message, MessageCodec, RejectReason};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::codec::Encoder;
use tokio_util::sync::CancellationToken;

/// The first byte of every TLS handshake record; a tandem frame starts with its length's high
/// byte, which is 0 for any frame a peer may send.
const TLS_HANDSHAKE: u8 = 0x16;

/// A TLS setup that cannot be used: a file is missing or does not hold what it should.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: cannot read {what} {}: {error} (run `tandem certs` for a first try, or point [tls] at your certificates)", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("TLS: {path} holds no {what} in PEM form")]
    Empty { what: &'static str, path: PathBuf },
    #[error("TLS: {what}: {message}")]
    Invalid { what: String, message: String },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.to_path_buf(),
        error,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|error| TlsError::Read {
        what: "private key",
        path: path.to_path_buf(),
        error,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::Empty {
        what: "private key",
        path: path.to_path_buf(),
    })
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in read_certs(ca, "CA certificate")? {
        store.add(cert).map_err(|e| TlsError::Invalid {
            what: format!("CA certificate {}", ca.display()),
            message: e.to_string(),
        })?;
    }
    Ok(Arc::new(store))
}

fn invalid(what: impl Into<String>) -> impl FnOnce(rustls::Error) -> TlsError {
    let what = what.into();
    move |e| TlsError::Invalid {
        what,
        message: e.to_string(),
    }
}

/// The files of one TLS identity, watched for changes.
#[derive(Debug)]
struct Files {
    paths: Vec<PathBuf>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

impl Files {
    fn new(paths: Vec<PathBuf>) -> Files {
        let stamps = Mutex::new(paths.iter().map(|p| modified(p)).collect());
        Files { paths, stamps }
    }

    /// Whether any file changed since the last call.
    fn changed(&self) -> bool {
        let now: Vec<_> = self.paths.iter().map(|p| modified(p)).collect();
        let mut stamps = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
        if *stamps != now {
            *stamps = now;
            return true;
        }
        false
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// What a component serves with: its certificate and key, and whose clients it accepts.
#[derive(Debug)]
pub struct ServerTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    require_client_cert: bool,
    files: Files,
    config: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    pub fn load(
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        require_client_cert: bool,
    ) -> Result<Arc<ServerTls>, TlsError> {
        let config = Self::build(&ca, &cert, &key, require_client_cert)?;
        Ok(Arc::new(ServerTls {
            files: Files::new(vec![ca.clone(), cert.clone(), key.clone()]),
            ca,
            cert,
            key,
            require_client_cert,
            config: RwLock::new(config),
        }))
    }

    fn build(
        ca: &Path,
        cert: &Path,
        key: &Path,
        require_client_cert: bool,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(invalid("protocol versions"))?;
        let builder = if require_client_cert {
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                    .build()
                    .map_err(|e| TlsError::Invalid {
                        what: format!("client verification with {}", ca.display()),
                        message: e.to_string(),
                    })?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(read_certs(cert, "certificate")?, read_key(key)?)
            .map_err(invalid(format!(
                "certificate {} with key {}",
                cert.display(),
                key.display()
            )))?;
        Ok(Arc::new(config))
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// What a component connects with: the CA to trust, the name every member must carry, and
/// the certificate it presents under mutual TLS.
#[derive(Debug)]
pub struct ClientTls {
    ca: PathBuf,
    identity: Option<(PathBuf, PathBuf)>,
    pub server_name: String,
    name: ServerName<'static>,
    files: Files,
    config: RwLock<Arc<ClientConfig>>,
}

impl ClientTls {
    pub fn load(
        ca: PathBuf,
        identity: Option<(PathBuf, PathBuf)>,
        server_name: &str,
    ) -> Result<Arc<ClientTls>, TlsError> {
        let name =
            ServerName::try_from(server_name.to_string()).map_err(|e| TlsError::Invalid {
                what: format!("the name to verify, {server_name:?}"),
                message: e.to_string(),
            })?;
        let config = Self::build(&ca, identity.as_ref())?;
        let mut paths = vec![ca.clone()];
        if let Some((cert, key)) = &identity {
            paths.extend([cert.clone(), key.clone()]);
        }
        Ok(Arc::new(ClientTls {
            files: Files::new(paths),
            ca,
            identity,
            server_name: server_name.to_string(),
            name,
            config: RwLock::new(config),
        }))
    }

    fn build(
        ca: &Path,
        identity: Option<&(PathBuf, PathBuf)>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(invalid("protocol versions"))?
            .with_root_certificates(roots(ca)?);
        let config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(read_certs(cert, "client certificate")?, read_key(key)?)
                .map_err(invalid(format!(
                    "client certificate {} with key {}",
                    cert.display(),
                    key.display()
                )))?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }

    fn current(&self) -> Arc<ClientConfig> {
        self.config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// Something whose files can be read again.
pub trait Reload: Send + Sync {
    /// Reads the files again if they changed (or always, when `force`); an unusable new set is
    /// logged and the one in use is kept.
    fn reload(&self, force: bool);
}

impl Reload for ServerTls {
    fn reload(&self, force: bool) {
        if !self.files.changed() && !force {
            return;
        }
        match Self::build(&self.ca, &self.cert, &self.key, self.require_client_cert) {
            Ok(config) => {
                if let Ok(mut c) = self.config.write() {
                    *c = config;
                }
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => tracing::error!("{e}; keeping the certificate in use"),
        }
    }
}

impl Reload for ClientTls {
    fn reload(&self, force: bool) {
        if !self.files.changed() && !force {
            return;
        }
        match Self::build(&self.ca, self.identity.as_ref()) {
            Ok(config) => {
                if let Ok(mut c) = self.config.write() {
                    *c = config;
                }
                tracing::info!(ca = %self.ca.display(), "TLS client settings reloaded");
            }
            Err(e) => tracing::error!("{e}; keeping the settings in use"),
        }
    }
}

/// Reloads `what` when its files change (checked every second) and on SIGHUP, until `shutdown`.
pub async fn watch(what: Vec<Arc<dyn Reload>>, shutdown: CancellationToken) {
    if what.is_empty() {
        return;
    }
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; certificates reload on change only");
            None
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let force = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
            _ = shutdown.cancelled() => return,
        };
        for item in &what {
            item.reload(force);
        }
    }
}

/// A link's byte stream, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Writes a plaintext `Reject` a tandem client can read, then closes.
async fn refuse_plain(mut tcp: TcpStream, message: String) {
    let mut buf = BytesMut::new();
    let reject = Message::Reject {
        reason: RejectReason::BadRequest,
        message,
    };
    if MessageCodec::default().encode(&reject, &mut buf).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(&buf)).await;
    }
    let _ = tcp.shutdown().await;
}

/// Server side of a new connection: the TLS handshake when `tls` is set, after checking that
/// the client speaks what the port does. `None`: the connection was refused (and logged).
pub async fn accept(tcp: TcpStream, tls: Option<&ServerTls>, peer: SocketAddr) -> Option<Stream> {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(crate::HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await;
    let speaks_tls = match peeked {
        Ok(Ok(1)) => first[0] == TLS_HANDSHAKE,
        // Gone or silent: the handshake timeout of the plain path reports it.
        _ => false,
    };
    match (tls, speaks_tls) {
        (None, false) => Some(Stream::Plain(tcp)),
        (None, true) => {
            tracing::warn!(%peer, "refused a TLS client on a plaintext port: set [tls] in the pair file of every component, or none");
            refuse_plain(
                tcp,
                "this port is plaintext, but the client speaks TLS: set [tls] in the pair file of every component, or none".into(),
            )
            .await;
            None
        }
        (Some(_), false) => {
            tracing::warn!(%peer, "refused a plaintext client on a TLS port: the client needs the pair file's [tls] section");
            refuse_plain(
                tcp,
                "this port speaks TLS: give the client the pair file's [tls] section".into(),
            )
            .await;
            None
        }
        (Some(tls), true) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            match tokio::time::timeout(crate::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => Some(Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(
                    stream,
                )))),
                Ok(Err(e)) => {
                    tracing::warn!(%peer, "TLS handshake refused: {}", describe_server(&e));
                    None
                }
                Err(_) => {
                    tracing::warn!(%peer, "no TLS handshake within {:?}", crate::HANDSHAKE_TIMEOUT);
                    None
                }
            }
        }
    }
}

fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

fn describe_certificate(e: &rustls::CertificateError, whose: &str, name: &str) -> String {
    use rustls::CertificateError as C;
    match e {
        C::UnknownIssuer | C::BadSignature | C::UnknownRevocationStatus => {
            format!("{whose} certificate is not signed by a trusted CA")
        }
        C::Expired | C::ExpiredContext { .. } => format!("{whose} certificate has expired"),
        C::NotValidYet | C::NotValidYetContext { .. } => {
            format!("{whose} certificate is not valid yet")
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            format!("{whose} certificate does not name {name:?}")
        }
        C::Revoked => format!("{whose} certificate is revoked"),
        other => format!("{whose} certificate is not acceptable ({other:?})"),
    }
}

fn describe_server(e: &io::Error) -> String {
    match rustls_error(e) {
        Some(rustls::Error::InvalidCertificate(c)) => describe_certificate(c, "the client's", ""),
        Some(rustls::Error::NoCertificatesPresented) => {
            "the client presented no certificate, and this port requires one (mutual TLS)".into()
        }
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("the client refused this server's certificate ({alert:?})")
        }
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

/// A refusal of this client's certificate that arrived after the handshake (TLS 1.3), as a
/// one-line message; None for any other error.
pub fn refusal(e: &io::Error, addr: SocketAddr) -> Option<String> {
    match rustls_error(e) {
        Some(rustls::Error::AlertReceived(alert)) => Some(format!(
            "{addr} refused this client's certificate ({alert:?}): it needs one signed by the pair's CA"
        )),
        _ => None,
    }
}

/// Why a client's TLS handshake failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct HandshakeError {
    pub message: String,
    /// A certificate problem (trust, expiry, name, a refused client certificate): trying again
    /// will not help until someone changes a certificate.
    pub certificate: bool,
}

/// Client side: the TLS handshake with a member of the pair, verified against the pair's name.
pub async fn connect(
    tcp: TcpStream,
    tls: Option<&ClientTls>,
    addr: SocketAddr,
) -> Result<Stream, HandshakeError> {
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    let connector = tokio_rustls::TlsConnector::from(tls.current());
    match connector.connect(tls.name.clone(), tcp).await {
        Ok(stream) => Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(
            stream,
        )))),
        Err(e) => {
            let (message, certificate) = match rustls_error(&e) {
                Some(rustls::Error::InvalidCertificate(c)) => (
                    describe_certificate(c, &format!("{addr}'s"), &tls.server_name),
                    true,
                ),
                Some(rustls::Error::AlertReceived(alert)) => (
                    format!("{addr} refused this client's certificate ({alert:?})"),
                    true,
                ),
                Some(rustls::Error::InvalidMessage(_)) => (
                    format!(
                        "{addr} does not speak TLS (is it a plaintext port? its pair file needs the [tls] section)"
                    ),
                    false,
                ),
                Some(other) => (format!("TLS with {addr}: {other}"), false),
                None if e.kind() == io::ErrorKind::UnexpectedEof => (
                    format!("{addr} closed the connection during the TLS handshake"),
                    false,
                ),
                None => (format!("TLS with {addr}: {e}"), false),
            };
            Err(HandshakeError {
                message,
                certificate,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };

    use super::*;

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names`, valid in the given years.
    fn leaf(ca: &Ca, names: &[&str], years: (i32, i32)) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
        params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
        (
            params.signed_by(&key, &ca.issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Serves one TLS handshake with `cert` from `server_ca`'s pair, and connects to it with a
    /// client trusting `client_ca` that verifies `name`; returns the client's error.
    async fn handshake(
        server_ca: &Ca,
        cert: (String, String),
        client_ca: &Ca,
        name: &str,
    ) -> Result<(), HandshakeError> {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerTls::load(
            write(dir.path(), "ca.crt", &server_ca.pem),
            write(dir.path(), "s.crt", &cert.0),
            write(dir.path(), "s.key", &cert.1),
            false,
        )
        .unwrap();
        let client = ClientTls::load(
            write(dir.path(), "client-ca.crt", &client_ca.pem),
            None,
            name,
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            let (tcp, peer) = listener.accept().await.unwrap();
            accept(tcp, Some(&server), peer).await.is_some()
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let result = connect(tcp, Some(&client), addr).await.map(|_| ());
        let _ = accepting.await;
        result
    }

    #[tokio::test]
    async fn certificate_problems_are_named() {
        let (good, other) = (ca(), ca());
        let now = 2026;
        let fine = leaf(&good, &["AGG_P", "AGG_V", "127.0.0.1"], (now - 1, now + 5));
        assert!(handshake(&good, fine.clone(), &good, "AGG_V").await.is_ok());

        let e = handshake(&good, fine.clone(), &other, "AGG_V")
            .await
            .unwrap_err();
        assert!(
            e.certificate && e.message.contains("not signed by a trusted CA"),
            "{e}"
        );

        let e = handshake(&good, fine, &good, "AGG_W").await.unwrap_err();
        assert!(
            e.certificate && e.message.contains("does not name \"AGG_W\""),
            "{e}"
        );

        let expired = leaf(&good, &["AGG_V"], (2000, 2001));
        let e = handshake(&good, expired, &good, "AGG_V").await.unwrap_err();
        assert!(e.certificate && e.message.contains("has expired"), "{e}");
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = write(dir.path(), "empty.pem", "not a certificate");
        let e = ClientTls::load(dir.path().join("nope.crt"), None, "AGG_V").unwrap_err();
        assert!(e.to_string().contains("nope.crt"), "{e}");
        let e = ClientTls::load(empty, None, "AGG_V").unwrap_err();
        assert!(
            e.to_string().contains("empty.pem holds no CA certificate"),
            "{e}"
        );
    }
}
