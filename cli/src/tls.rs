//! TLS settings from the pair file's `[tls]` section, for each kind of component.
//!
//! Servers (stores, proxies) present `cert`/`key` with `{name}` set to their own name.
//! Components that connect to other components (proxies, the gateway, the stores' heartbeat)
//! present the same certificate as their client certificate under mutual TLS. Probes and
//! operators present `client_cert`/`client_key`. Every client verifies every member against
//! one name: `server_name`, by default the pair's name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, bail};
use tandem_config::{PairFile, TlsSection, resolve};
use tandem_net::tls::{ClientTls, Reload, ServerTls};
use tokio_util::sync::CancellationToken;

fn paths(data_dir: &Path, tls: &TlsSection, component: &str) -> [PathBuf; 3] {
    let at = |p: &Path| resolve(data_dir, &TlsSection::for_component(p, component));
    [at(&tls.ca), at(&tls.cert), at(&tls.key)]
}

fn server_name(pair: &PairFile, tls: &TlsSection) -> String {
    tls.server_name
        .clone()
        .unwrap_or_else(|| pair.pair.name.clone())
}

/// What a store or proxy named `component` serves with.
pub fn server(pair: &PairFile, data_dir: &Path, component: &str) -> Result<Option<Arc<ServerTls>>> {
    let Some(tls) = &pair.tls else {
        return Ok(None);
    };
    let [ca, cert, key] = paths(data_dir, tls, component);
    Ok(Some(ServerTls::load(
        ca,
        cert,
        key,
        tls.require_client_cert,
    )?))
}

/// What `component` connects to other components with.
pub fn member_client(
    pair: &PairFile,
    data_dir: &Path,
    component: &str,
) -> Result<Option<Arc<ClientTls>>> {
    let Some(tls) = &pair.tls else {
        return Ok(None);
    };
    let [ca, cert, key] = paths(data_dir, tls, component);
    let identity = tls.require_client_cert.then_some((cert, key));
    Ok(Some(ClientTls::load(
        ca,
        identity,
        &server_name(pair, tls),
    )?))
}

/// What probes and operators connect with.
pub fn user_client(pair: &PairFile, data_dir: &Path) -> Result<Option<Arc<ClientTls>>> {
    let Some(tls) = &pair.tls else {
        return Ok(None);
    };
    let ca = resolve(data_dir, &tls.ca);
    let identity = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => Some((resolve(data_dir, cert), resolve(data_dir, key))),
        (None, None) if tls.require_client_cert => bail!(
            "{}: [tls] require_client_cert is on, so probes and operators need client_cert and client_key",
            pair.source
        ),
        (None, None) => None,
        _ => bail!(
            "{}: [tls] client_cert and client_key go together: set both or neither",
            pair.source
        ),
    };
    Ok(Some(ClientTls::load(
        ca,
        identity,
        &server_name(pair, tls),
    )?))
}

/// Reloads the given settings when their files change or on SIGHUP.
pub fn watch(
    server: &Option<Arc<ServerTls>>,
    client: &Option<Arc<ClientTls>>,
    shutdown: CancellationToken,
) {
    let mut what: Vec<Arc<dyn Reload>> = Vec::new();
    if let Some(s) = server {
        what.push(s.clone());
    }
    if let Some(c) = client {
        what.push(c.clone());
    }
    if !what.is_empty() {
        tokio::spawn(tandem_net::tls::watch(what, shutdown));
    }
}
