//! `tandem status` and `tandem failback`: the pair at a glance, and the operator's fail-back.
//!
//! Stores are asked over the tandem protocol, proxies and gateways through their `/status`
//! endpoints. A component that does not answer shows as down: status is what an operator runs
//! when something is wrong, so it never fails because a component did.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::{Value, json};
use tandem_config::PairFile;
use tandem_net::tls::ClientTls;
use tandem_probe::Connection;
use tandem_protocol::{ClientKind, Message};

const TIMEOUT: Duration = Duration::from_secs(2);

async fn store_status(
    pair: &PairFile,
    tls: Option<&ClientTls>,
    name: &str,
    addr: SocketAddr,
) -> Value {
    let asked = async {
        let mut conn = Connection::connect_tls(
            addr,
            ClientKind::Operator,
            "status",
            pair.pair.max_frame_bytes,
            TIMEOUT,
            tls,
        )
        .await
        .ok()?;
        match conn.request(&Message::StatusRequest, TIMEOUT).await.ok()? {
            Message::Status(s) => Some(s),
            _ => None,
        }
    };
    let role = pair
        .store(name)
        .map(|s| format!("{:?}", s.role).to_lowercase())
        .unwrap_or_default();
    match asked.await {
        Some(s) => json!({
            "name": name, "up": true, "role": role, "acting_primary": s.acting_primary,
            "alerts": s.alerts, "lsn": s.lsn, "first_lsn": s.first_lsn,
            "resynced": s.resynced, "peer_up": s.peer_up,
        }),
        None => {
            json!({"name": name, "up": false, "role": role, "acting_primary": false, "alerts": null, "lsn": null})
        }
    }
}

fn http_status(addr: Option<SocketAddr>) -> Option<Value> {
    let addr = addr?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let body = agent
        .get(&format!("http://{addr}/status"))
        .call()
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()?;
    serde_json::from_str(&body).ok()
}

/// [`http_status`] off the async thread, so that every member is asked at once.
async fn http_status_of(addr: Option<SocketAddr>) -> Option<Value> {
    let addr = addr?;
    tokio::task::spawn_blocking(move || http_status(Some(addr)))
        .await
        .ok()
        .flatten()
}

/// Asks every member at once: with several of them hung, asking one after the other would
/// add up their timeouts, when status is what an operator runs because something is wrong.
pub async fn collect(pair: &PairFile, tls: Option<&ClientTls>) -> Value {
    let stores = futures::future::join_all(pair.stores.iter().map(|s| async move {
        let (mut status, http) = tokio::join!(
            store_status(pair, tls, &s.name, s.listen.0),
            http_status_of(s.http.map(|a| a.0))
        );
        // A store whose commit is stuck (a hung disk) may still answer the protocol; only its
        // `/status` says so. Null when it has no HTTP address or does not answer there.
        status["stalled"] = http.map_or(Value::Null, |h| h["stalled"].clone());
        status
    }));
    let proxies = futures::future::join_all(
        pair.proxies
            .iter()
            .map(|p| http_status_of(p.http.map(|a| a.0))),
    );
    let gateways = futures::future::join_all(
        pair.gateways
            .iter()
            .map(|g| http_status_of(g.http.map(|a| a.0))),
    );
    let (stores, proxies, gateways) = tokio::join!(stores, proxies, gateways);
    let proxies: Vec<Value> = pair
        .proxies
        .iter()
        .zip(proxies)
        .map(|(p, status)| match status {
            Some(s) => json!({
                "name": p.name, "up": true, "store": p.store, "probes": s["probes"],
                "store_up": s["store_up"], "events_forwarded": s["events_forwarded"],
            }),
            None => json!({"name": p.name, "up": false, "store": p.store, "probes": null}),
        })
        .collect();
    let gateways: Vec<Value> = pair
        .gateways
        .iter()
        .zip(gateways)
        .map(|(g, status)| match status {
            Some(s) => json!({
                "name": g.name, "up": true, "state": s["state"], "resynced": s["resynced"],
                "directions": s["directions"],
            }),
            None => json!({"name": g.name, "up": false, "state": null, "resynced": false}),
        })
        .collect();
    let acting: Vec<&str> = stores
        .iter()
        .filter(|s| s["up"] == true && s["acting_primary"] == true)
        .filter_map(|s| s["name"].as_str())
        .collect();
    json!({
        "pair": pair.pair.name,
        "acting_primary": acting,
        "stores": stores,
        "proxies": proxies,
        "gateways": gateways,
    })
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn print(status: &Value, as_json: bool) {
    if as_json {
        say!("{status}");
        return;
    }
    for line in lines(status) {
        say!("{line}");
    }
}

/// The human-readable status, a line each for the pair and every component.
fn lines(status: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let updown = |v: &Value| if v["up"] == true { "up" } else { "DOWN" };
    out.push(format!(
        "pair {}: acting primary {}",
        show(&status["pair"]),
        show(&status["acting_primary"])
    ));
    for s in status["stores"].as_array().into_iter().flatten() {
        // Up or not, a store that says its commit is stuck is neither working nor gone.
        let state = if s["stalled"] == true {
            "STALLED"
        } else {
            updown(s)
        };
        out.push(format!(
            "  store   {:<8} {:<4} {:<8} acting {:<5} alerts {:>8} lsn {:>10} resynced {}",
            show(&s["name"]),
            state,
            show(&s["role"]),
            show(&s["acting_primary"]),
            show(&s["alerts"]),
            show(&s["lsn"]),
            show(&s["resynced"]),
        ));
    }
    for p in status["proxies"].as_array().into_iter().flatten() {
        out.push(format!(
            "  proxy   {:<8} {:<4} -> {:<6} probes {:>6} store link {}",
            show(&p["name"]),
            updown(p),
            show(&p["store"]),
            show(&p["probes"]),
            show(&p["store_up"]),
        ));
    }
    for g in status["gateways"].as_array().into_iter().flatten() {
        let lag: Vec<String> = g["directions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                let resync = &d["full_resync"];
                if resync.is_object() {
                    format!(
                        "{}->{} full resync {} of {} records",
                        show(&d["from"]),
                        show(&d["to"]),
                        show(&resync["merged"]),
                        show(&resync["total"])
                    )
                } else {
                    format!(
                        "{}->{} lag {}",
                        show(&d["from"]),
                        show(&d["to"]),
                        show(&d["lag"])
                    )
                }
            })
            .collect();
        out.push(format!(
            "  gateway {:<8} {:<4} {:<10} resynced {:<5} {}",
            show(&g["name"]),
            updown(g),
            show(&g["state"]),
            show(&g["resynced"]),
            lag.join(", "),
        ));
    }
    out
}

/// Asks the backup to send its clients back to the primary.
pub async fn failback(pair: &PairFile, tls: Option<&ClientTls>, force: bool) -> Result<String> {
    let backup = pair.backup_store();
    let mut conn = Connection::connect_tls(
        backup.listen.0,
        ClientKind::Operator,
        "failback",
        pair.pair.max_frame_bytes,
        TIMEOUT * 2,
        tls,
    )
    .await
    .map_err(|e| anyhow::anyhow!("the backup store {} is not reachable: {e}", backup.name))?;
    match conn
        .request(&Message::Failback { force }, TIMEOUT * 2)
        .await?
    {
        Message::Done { message } => Ok(format!("{}: {message}", backup.name)),
        Message::Error { message } => bail!("{} refused: {message}", backup.name),
        other => bail!("{} answered {}", backup.name, other.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(name: &str, up: bool, stalled: Value) -> Value {
        json!({"name": name, "up": up, "role": "primary", "acting_primary": up,
            "alerts": 7, "lsn": 8, "resynced": true, "stalled": stalled})
    }

    #[test]
    fn a_store_whose_commit_is_stuck_shows_as_stalled_whether_or_not_it_answers() {
        let status = json!({
            "pair": "AGG_V",
            "acting_primary": ["AGG_P"],
            "stores": [
                store("AGG_P", true, json!(true)),
                store("AGG_B", false, json!(true)),
                store("AGG_C", true, json!(false)),
                store("AGG_D", true, Value::Null),
                store("AGG_E", false, Value::Null),
            ],
            "proxies": [],
            "gateways": [],
        });
        let shown = lines(&status);
        let state = |name: &str| {
            let line = shown
                .iter()
                .find(|l| l.trim_start().starts_with("store") && l.contains(name))
                .unwrap();
            line.split_whitespace().nth(2).unwrap().to_string()
        };
        assert_eq!(state("AGG_P"), "STALLED");
        assert_eq!(state("AGG_B"), "STALLED");
        assert_eq!(state("AGG_C"), "up");
        assert_eq!(state("AGG_D"), "up");
        assert_eq!(state("AGG_E"), "DOWN");
    }
}
