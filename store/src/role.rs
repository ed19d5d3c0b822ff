//! Who is acting primary, as a state machine without I/O.
//!
//! The primary is acting primary whenever it runs. The backup watches the primary with a
//! heartbeat and becomes acting primary after `misses_down` missed answers in a row; it hands
//! the role back (and tells its clients to go back to the primary) only when the primary has
//! answered `successes_up` times in a row, reports a finished resync, and has stayed up for the
//! hold-down, so a flapping primary does not move the clients back and forth. With manual
//! fail-back only an operator's request moves them; `force` skips the checks.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct RoleSettings {
    pub misses_down: u32,
    pub successes_up: u32,
    pub hold_down: Duration,
    pub auto_failback: bool,
}

impl Default for RoleSettings {
    fn default() -> Self {
        RoleSettings {
            misses_down: 3,
            successes_up: 2,
            hold_down: Duration::from_secs(2),
            auto_failback: true,
        }
    }
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoleInput {
    /// The peer (the primary, seen from the backup) answered a heartbeat.
    PeerAnswered {
        resynced: bool,
    },
    PeerMissed,
    /// An operator asked for fail-back.
    Failback {
        force: bool,
    },
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoleAction {
    BecomeActing,
    /// Stop acting and send every client back to the primary.
    FailBack,
    /// An operator's fail-back was refused, and why.
    Refuse(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// The primary: always acting.
    Primary,
    Standby {
        misses: u32,
    },
    Acting {
        successes: u32,
        up_since: Option<Instant>,
        resynced: bool,
    },
}

#[derive(Clone, Debug)]
pub struct Role {
    settings: RoleSettings,
    state: State,
}

impl Role {
    pub fn primary() -> Role {
        Role {
            settings: RoleSettings::default(),
            state: State::Primary,
        }
    }

    /// A backup starts as standby: it acts only once it has seen the primary gone.
    pub fn backup(settings: RoleSettings) -> Role {
        Role {
            settings,
            state: State::Standby { misses: 0 },
        }
    }

    pub fn acting(&self) -> bool {
        !matches!(self.state, State::Standby { .. })
    }

    /// Whether the peer is answering now (as far as the backup can tell).
    pub fn peer_up(&self) -> bool {
        match self.state {
            State::Primary => false,
            State::Standby { misses } => misses < self.settings.misses_down,
            State::Acting { up_since, .. } => up_since.is_some(),
        }
    }

    pub fn handle(&mut self, input: RoleInput, now: Instant) -> Vec<RoleAction> {
        let settings = &self.settings;
        match (&mut self.state, input) {
            (State::Primary, RoleInput::Failback { .. }) => {
                vec![RoleAction::Refuse(
                    "this is the primary: fail-back is asked of the backup".into(),
                )]
            }
            (State::Primary, _) => Vec::new(),
            (State::Standby { misses }, RoleInput::PeerMissed) => {
                *misses += 1;
                if *misses >= settings.misses_down {
                    self.state = State::Acting {
                        successes: 0,
                        up_since: None,
                        resynced: false,
                    };
                    vec![RoleAction::BecomeActing]
                } else {
                    Vec::new()
                }
            }
            (State::Standby { misses }, RoleInput::PeerAnswered { .. }) => {
                *misses = 0;
                Vec::new()
            }
            (State::Standby { .. }, RoleInput::Failback { .. }) => vec![RoleAction::Refuse(
                "the backup is not acting primary: its clients are already with the primary".into(),
            )],
            (
                State::Acting {
                    successes,
                    up_since,
                    resynced: last,
                },
                RoleInput::PeerAnswered { resynced },
            ) => {
                *successes += 1;
                *last = resynced;
                if *successes >= settings.successes_up && up_since.is_none() {
                    *up_since = Some(now);
                }
                let held = up_since.is_some_and(|t| now.duration_since(t) >= settings.hold_down);
                if settings.auto_failback && resynced && held {
                    self.state = State::Standby { misses: 0 };
                    vec![RoleAction::FailBack]
                } else {
                    Vec::new()
                }
            }
            (
                State::Acting {
                    successes,
                    up_since,
                    ..
                },
                RoleInput::PeerMissed,
            ) => {
                *successes = 0;
                *up_since = None;
                Vec::new()
            }
            (
                State::Acting {
                    up_since, resynced, ..
                },
                RoleInput::Failback { force },
            ) => {
                let refusal = if force {
                    None
                } else if up_since.is_none() {
                    Some("the primary is not reachable; use --force to fail back anyway")
                } else if !*resynced {
                    Some("the primary has not finished its resync; wait, or use --force")
                } else {
                    None
                };
                match refusal {
                    Some(reason) => vec![RoleAction::Refuse(reason.into())],
                    None => {
                        self.state = State::Standby { misses: 0 };
                        vec![RoleAction::FailBack]
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_primary_always_acts() {
        let mut r = Role::primary();
        assert!(r.acting());
        assert!(r.handle(RoleInput::PeerMissed, Instant::now()).is_empty());
        assert!(r.acting());
    }

    #[test]
    fn the_backup_acts_after_misses_in_a_row_only() {
        let t = Instant::now();
        let mut r = Role::backup(RoleSettings::default());
        assert!(!r.acting());
        r.handle(RoleInput::PeerMissed, t);
        r.handle(RoleInput::PeerMissed, t);
        r.handle(RoleInput::PeerAnswered { resynced: true }, t);
        r.handle(RoleInput::PeerMissed, t);
        assert!(!r.acting(), "an answer resets the count");
        r.handle(RoleInput::PeerMissed, t);
        assert_eq!(
            r.handle(RoleInput::PeerMissed, t),
            vec![RoleAction::BecomeActing]
        );
        assert!(r.acting());
    }

    fn acting_backup(t: Instant) -> Role {
        let mut r = Role::backup(RoleSettings::default());
        for _ in 0..3 {
            r.handle(RoleInput::PeerMissed, t);
        }
        assert!(r.acting());
        r
    }

    #[test]
    fn fail_back_waits_for_resync_and_hold_down() {
        let t = Instant::now();
        let mut r = acting_backup(t);
        let answered = |resynced| RoleInput::PeerAnswered { resynced };
        assert!(r.handle(answered(false), t).is_empty());
        assert!(
            r.handle(answered(false), t + ms(100)).is_empty(),
            "up, not resynced"
        );
        assert!(
            r.handle(answered(true), t + ms(1_000)).is_empty(),
            "resynced, holding down"
        );
        assert_eq!(
            r.handle(answered(true), t + ms(2_100)),
            vec![RoleAction::FailBack]
        );
        assert!(!r.acting());
    }

    #[test]
    fn a_flapping_primary_restarts_the_hold_down() {
        let t = Instant::now();
        let mut r = acting_backup(t);
        let up = RoleInput::PeerAnswered { resynced: true };
        r.handle(up.clone(), t);
        r.handle(up.clone(), t + ms(100));
        r.handle(RoleInput::PeerMissed, t + ms(1_500));
        r.handle(up.clone(), t + ms(1_600));
        r.handle(up.clone(), t + ms(1_700));
        assert!(
            r.handle(up.clone(), t + ms(2_500)).is_empty(),
            "hold-down restarted at 1.7 s"
        );
        assert_eq!(r.handle(up, t + ms(3_800)), vec![RoleAction::FailBack]);
    }

    #[test]
    fn manual_fail_back_needs_an_operator_and_checks_unless_forced() {
        let t = Instant::now();
        let mut r = Role::backup(RoleSettings {
            auto_failback: false,
            ..RoleSettings::default()
        });
        for _ in 0..3 {
            r.handle(RoleInput::PeerMissed, t);
        }
        let refused = r.handle(RoleInput::Failback { force: false }, t);
        assert!(matches!(&refused[..], [RoleAction::Refuse(m)] if m.contains("not reachable")));
        for i in 0..10 {
            let acts = r.handle(
                RoleInput::PeerAnswered { resynced: false },
                t + ms(1_000 * i),
            );
            assert!(acts.is_empty(), "manual: never on its own");
        }
        let refused = r.handle(RoleInput::Failback { force: false }, t + ms(10_000));
        assert!(matches!(&refused[..], [RoleAction::Refuse(m)] if m.contains("resync")));
        assert_eq!(
            r.handle(RoleInput::Failback { force: true }, t + ms(10_000)),
            vec![RoleAction::FailBack]
        );
    }
}
