//! The store's watch on its peer, and acting on role changes.
//!
//! The backup asks the primary for its status every `heartbeat`; an answer or a miss goes to
//! the [`Role`] machine, whose decisions are carried out here: the acting flag (which
//! `/active`, housekeeping and new clients see), the fail-back directive to every connected
//! client, a line in the log, a metric, and the pair file's `on_role_change` command.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tandem_probe::Connection;
use tandem_protocol::{ClientKind, Directive, Kind, Message, Severity};
use tokio_util::sync::CancellationToken;

use crate::engine::Shared;
use crate::role::{RoleAction, RoleInput};

/// Settings of the watch.
#[derive(Clone, Debug)]
pub struct PeerOptions {
    pub name: String,
    pub addr: SocketAddr,
    pub heartbeat: Duration,
    pub max_frame: usize,
    pub on_role_change: Option<String>,
    /// TLS to the peer (None: plaintext).
    pub tls: Option<Arc<tandem_net::tls::ClientTls>>,
}

/// Feeds one input to the role machine and carries out what it decides; returns the refusal
/// reason for an operator's request, if any.
pub fn role_input(
    shared: &Shared,
    input: RoleInput,
    on_role_change: Option<&str>,
) -> Result<String, String> {
    let actions = match shared.role.lock() {
        Ok(mut role) => role.handle(input, Instant::now()),
        Err(_) => return Err("the role state is unavailable".into()),
    };
    let mut outcome = Ok("nothing to do".to_string());
    for action in actions {
        match action {
            RoleAction::BecomeActing => {
                set_acting(shared, true, on_role_change);
                shared.notice(
                    "failover",
                    Kind::Problem,
                    Severity::MAJOR,
                    format!(
                        "{} is acting primary: the primary does not answer",
                        shared.name
                    ),
                );
                outcome = Ok("acting primary".into());
            }
            RoleAction::FailBack => {
                set_acting(shared, false, on_role_change);
                let _ = shared.directives.send(Directive::Failback);
                // A resolution with the failover notice's key: it clears that notice.
                shared.notice(
                    "failover",
                    Kind::Resolution,
                    Severity::CLEAR,
                    format!(
                        "{} failed back: its clients went back to the primary",
                        shared.name
                    ),
                );
                tracing::info!(store = %shared.name, "failing back: every client is sent to the primary");
                metrics::counter!("tandem_store_failbacks_total").increment(1);
                outcome = Ok("clients sent back to the primary".into());
            }
            RoleAction::Refuse(reason) => outcome = Err(reason),
        }
    }
    outcome
}

fn set_acting(shared: &Shared, acting: bool, on_role_change: Option<&str>) {
    let was = shared.acting_primary.swap(acting, Ordering::Relaxed);
    if was == acting {
        return;
    }
    let role = if acting { "acting-primary" } else { "standby" };
    tracing::warn!(store = %shared.name, role, "role change");
    metrics::counter!("tandem_store_role_changes_total", "to" => role).increment(1);
    let _ = shared.role_changes.send(acting);
    if let Some(command) = on_role_change {
        // Run, not awaited: a slow hook must not hold up the role change it reports.
        match std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .env("TANDEM_ROLE", role)
            .env("TANDEM_STORE", &shared.name)
            .spawn()
        {
            Ok(mut child) => {
                std::thread::spawn(move || child.wait());
            }
            Err(e) => tracing::warn!(error = %e, "on_role_change could not run"),
        }
    }
}

/// Watches the peer until `shutdown`.
pub async fn watch(shared: Arc<Shared>, options: PeerOptions, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(options.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<Connection> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if conn.is_none() {
            conn = match Connection::connect_tls(
                options.addr,
                ClientKind::Store,
                &shared.name,
                options.max_frame,
                options.heartbeat,
                options.tls.as_deref(),
            )
            .await
            {
                Ok(c) => Some(c),
                Err(e) => {
                    // A certificate problem looks like a dead peer to the role machine; the
                    // log has to say which it is.
                    if e.is_certificate() {
                        tracing::warn!(peer = %options.name, "heartbeat: {e}");
                    }
                    None
                }
            };
        }
        let answer = match conn.as_mut() {
            Some(c) => c
                .request(&Message::StatusRequest, options.heartbeat)
                .await
                .ok(),
            None => None,
        };
        let input = match answer {
            Some(Message::Status(status)) => RoleInput::PeerAnswered {
                resynced: status.resynced,
            },
            _ => {
                conn = None;
                RoleInput::PeerMissed
            }
        };
        shared.peer_up.store(
            matches!(input, RoleInput::PeerAnswered { .. }),
            Ordering::Relaxed,
        );
        let _ = role_input(&shared, input, options.on_role_change.as_deref());
    }
}
