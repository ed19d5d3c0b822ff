//! The probe's failover and fail-back decisions, as a state machine without I/O.
//!
//! [`Failover`] takes what happened (a connection made or refused, a link lost, a directive, the
//! result of polling the primary, the passing of time) and returns what to do (connect to a
//! member, drop the link, send a heartbeat, poll the primary, resend what is unacknowledged).
//! The tokio driver in [`crate::pair`] performs the actions; the tests here drive the machine
//! with made-up instants, so every rule is checked without sockets or sleeps.
//!
//! The rules:
//! - start on the primary; when a member refuses, fails or goes silent past `dead_after`, try
//!   the other one at once; when both fail in a row, back off (doubling to a second) and start
//!   again from the primary;
//! - a refusal that retrying cannot fix (protocol version, TLS, authorisation) from both members
//!   ends the client with that reason;
//! - on the backup, poll the primary every `poll_interval` and go back after `polls_to_return`
//!   good answers in a row (a flapping primary does not flap the probes); obey fail-back,
//!   redirect and leave directives at once;
//! - after every new connection, resend everything unacknowledged.

use std::time::{Duration, Instant};

/// A member of the virtual pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Member {
    Primary,
    Backup,
}

impl Member {
    pub fn other(self) -> Member {
        match self {
            Member::Primary => Member::Backup,
            Member::Backup => Member::Primary,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// How often a connected link is pinged.
    pub heartbeat: Duration,
    /// Silence after which a link counts as dead.
    pub dead_after: Duration,
    /// How often a probe on the backup polls the primary.
    pub poll_interval: Duration,
    /// Good polls in a row before going back to the primary; 0 never goes back on its own
    /// (fail-back only by directive).
    pub polls_to_return: u32,
    pub max_backoff: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat: Duration::from_millis(200),
            dead_after: Duration::from_millis(500),
            poll_interval: Duration::from_millis(500),
            polls_to_return: 2,
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Start,
    Connected(Member),
    /// The member refused or could not be reached; `fatal` when retrying cannot help.
    ConnectFailed {
        member: Member,
        fatal: Option<String>,
    },
    /// The link broke (closed, reset, undecodable).
    LinkLost,
    /// Anything arrived on the link.
    Heard,
    /// The store (through the proxy) says: go back to the primary.
    Failback,
    /// Go to this member.
    Redirect(Member),
    /// This member cannot serve: go to the other one.
    Leave,
    /// The outcome of a poll of the primary: it answered and is fit to take the probe back.
    Polled {
        good: bool,
    },
    Tick,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Connect(Member),
    /// Drop the current link (its unacknowledged events stay spooled).
    Disconnect,
    SendPing,
    PollPrimary,
    ResendUnacked,
    /// Stop: neither member can ever accept this client.
    GiveUp(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Idle,
    Connecting {
        member: Member,
        /// The other member already failed in this round.
        other_failed: bool,
    },
    Connected {
        member: Member,
        last_heard: Instant,
        last_ping: Instant,
        next_poll: Instant,
        good_polls: u32,
        polling: bool,
    },
    Waiting {
        until: Instant,
    },
    Stopped,
}

/// The failover state machine.
#[derive(Clone, Debug)]
pub struct Failover {
    settings: Settings,
    state: State,
    backoff: Duration,
    fatal: [Option<String>; 2],
    failovers: u64,
    last_member: Option<Member>,
}

fn slot(member: Member) -> usize {
    match member {
        Member::Primary => 0,
        Member::Backup => 1,
    }
}

impl Failover {
    pub fn new(settings: Settings) -> Failover {
        Failover {
            settings,
            state: State::Idle,
            backoff: Duration::from_millis(50),
            fatal: [None, None],
            failovers: 0,
            last_member: None,
        }
    }

    /// The member the link is up to, if any.
    pub fn connected(&self) -> Option<Member> {
        match self.state {
            State::Connected { member, .. } => Some(member),
            _ => None,
        }
    }

    /// How many times the client moved from one member to the other.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    pub fn stopped(&self) -> bool {
        self.state == State::Stopped
    }

    fn connect(&mut self, member: Member, other_failed: bool) -> Vec<Action> {
        self.state = State::Connecting {
            member,
            other_failed,
        };
        vec![Action::Connect(member)]
    }

    /// Leaves `from` for the other member.
    fn move_from(&mut self, from: Member) -> Vec<Action> {
        let mut actions = vec![Action::Disconnect];
        actions.extend(self.connect(from.other(), false));
        actions
    }

    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match (&mut self.state, input) {
            (State::Stopped, _) => Vec::new(),
            (State::Idle, Input::Start) => self.connect(Member::Primary, false),
            (State::Connecting { member, .. }, Input::Connected(m)) if *member == m => {
                self.backoff = Duration::from_millis(50);
                self.fatal[slot(m)] = None;
                // A move between members; starting on the primary is not one.
                let first_on_primary = self.last_member.is_none() && m == Member::Primary;
                if self.last_member != Some(m) && !first_on_primary {
                    self.failovers += 1;
                }
                self.last_member = Some(m);
                self.state = State::Connected {
                    member: m,
                    last_heard: now,
                    last_ping: now,
                    next_poll: now + self.settings.poll_interval,
                    good_polls: 0,
                    polling: false,
                };
                vec![Action::ResendUnacked]
            }
            (
                State::Connecting {
                    member,
                    other_failed,
                },
                Input::ConnectFailed { member: m, fatal },
            ) if *member == m => {
                let other_failed = *other_failed;
                self.fatal[slot(m)] = fatal;
                if let (Some(a), Some(b)) = (&self.fatal[0], &self.fatal[1]) {
                    let reason = if a == b {
                        format!("both members refused: {a}")
                    } else {
                        format!("both members refused: primary: {a}; backup: {b}")
                    };
                    self.state = State::Stopped;
                    return vec![Action::GiveUp(reason)];
                }
                if other_failed {
                    self.state = State::Waiting {
                        until: now + self.backoff,
                    };
                    self.backoff = (self.backoff * 2).min(self.settings.max_backoff);
                    Vec::new()
                } else {
                    self.connect(m.other(), true)
                }
            }
            (State::Waiting { until }, Input::Tick) if now >= *until => {
                self.connect(Member::Primary, false)
            }
            (State::Connected { member, .. }, Input::LinkLost | Input::Leave) => {
                let from = *member;
                self.move_from(from)
            }
            (State::Connected { last_heard, .. }, Input::Heard) => {
                *last_heard = now;
                Vec::new()
            }
            (State::Connected { member, .. }, Input::Failback) => {
                if *member == Member::Backup {
                    self.move_from(Member::Backup)
                } else {
                    Vec::new()
                }
            }
            (State::Connected { member, .. }, Input::Redirect(to)) => {
                if *member == to {
                    Vec::new()
                } else {
                    let from = *member;
                    self.move_from(from)
                }
            }
            (
                State::Connected {
                    member,
                    good_polls,
                    polling,
                    ..
                },
                Input::Polled { good },
            ) => {
                *polling = false;
                if *member != Member::Backup {
                    return Vec::new();
                }
                *good_polls = if good { *good_polls + 1 } else { 0 };
                let wanted = self.settings.polls_to_return;
                if wanted > 0 && *good_polls >= wanted {
                    self.move_from(Member::Backup)
                } else {
                    Vec::new()
                }
            }
            (
                State::Connected {
                    member,
                    last_heard,
                    last_ping,
                    next_poll,
                    polling,
                    ..
                },
                Input::Tick,
            ) => {
                if now.duration_since(*last_heard) > self.settings.dead_after {
                    let from = *member;
                    return self.move_from(from);
                }
                let mut actions = Vec::new();
                if now.duration_since(*last_ping) >= self.settings.heartbeat {
                    *last_ping = now;
                    actions.push(Action::SendPing);
                }
                if *member == Member::Backup
                    && self.settings.polls_to_return > 0
                    && !*polling
                    && now >= *next_poll
                {
                    *polling = true;
                    *next_poll = now + self.settings.poll_interval;
                    actions.push(Action::PollPrimary);
                }
                actions
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn connected_to(member: Member, t0: Instant) -> Failover {
        let mut f = Failover::new(Settings::default());
        f.handle(Input::Start, t0);
        if member == Member::Backup {
            f.handle(
                Input::ConnectFailed {
                    member: Member::Primary,
                    fatal: None,
                },
                t0,
            );
        }
        assert_eq!(
            f.handle(Input::Connected(member), t0),
            vec![Action::ResendUnacked]
        );
        f
    }

    #[test]
    fn starts_on_the_primary_and_fails_over_at_once_when_refused() {
        let t0 = Instant::now();
        let mut f = Failover::new(Settings::default());
        assert_eq!(
            f.handle(Input::Start, t0),
            vec![Action::Connect(Member::Primary)]
        );
        let refused = Input::ConnectFailed {
            member: Member::Primary,
            fatal: None,
        };
        assert_eq!(f.handle(refused, t0), vec![Action::Connect(Member::Backup)]);
        assert_eq!(
            f.handle(Input::Connected(Member::Backup), t0),
            vec![Action::ResendUnacked]
        );
        assert_eq!(f.connected(), Some(Member::Backup));
        assert_eq!(f.failovers(), 1);
    }

    #[test]
    fn a_silent_link_is_dropped_after_dead_after() {
        let t0 = Instant::now();
        let mut f = connected_to(Member::Primary, t0);
        assert_eq!(f.handle(Input::Tick, t0 + ms(200)), vec![Action::SendPing]);
        f.handle(Input::Heard, t0 + ms(300));
        assert_eq!(f.handle(Input::Tick, t0 + ms(700)), vec![Action::SendPing]);
        assert_eq!(
            f.handle(Input::Tick, t0 + ms(801)),
            vec![Action::Disconnect, Action::Connect(Member::Backup)]
        );
    }

    #[test]
    fn both_members_down_backs_off_and_starts_again_from_the_primary() {
        let t0 = Instant::now();
        let mut f = Failover::new(Settings::default());
        f.handle(Input::Start, t0);
        let fail = |m| Input::ConnectFailed {
            member: m,
            fatal: None,
        };
        f.handle(fail(Member::Primary), t0);
        assert!(f.handle(fail(Member::Backup), t0).is_empty());
        assert!(f.handle(Input::Tick, t0 + ms(10)).is_empty(), "backing off");
        assert_eq!(
            f.handle(Input::Tick, t0 + ms(50)),
            vec![Action::Connect(Member::Primary)]
        );
        f.handle(fail(Member::Primary), t0 + ms(50));
        f.handle(fail(Member::Backup), t0 + ms(50));
        assert!(
            f.handle(Input::Tick, t0 + ms(120)).is_empty(),
            "backoff doubled"
        );
        assert_eq!(
            f.handle(Input::Tick, t0 + ms(150)),
            vec![Action::Connect(Member::Primary)]
        );
    }

    #[test]
    fn fatal_refusals_from_both_members_give_up() {
        let t0 = Instant::now();
        let mut f = Failover::new(Settings::default());
        f.handle(Input::Start, t0);
        let fatal = |m| Input::ConnectFailed {
            member: m,
            fatal: Some("certificate not trusted".into()),
        };
        f.handle(fatal(Member::Primary), t0);
        assert_eq!(
            f.handle(fatal(Member::Backup), t0),
            vec![Action::GiveUp(
                "both members refused: certificate not trusted".into()
            )]
        );
        assert!(f.stopped());
        assert!(f.handle(Input::Tick, t0 + ms(5000)).is_empty());
    }

    #[test]
    fn on_the_backup_it_polls_and_returns_after_good_polls_in_a_row() {
        let t0 = Instant::now();
        let mut f = connected_to(Member::Backup, t0);
        let mut now = t0;
        // Ticks every 100 ms (the link stays alive) until the machine asks for a poll.
        let mut until_poll = |f: &mut Failover| {
            for _ in 0..20 {
                now += ms(100);
                f.handle(Input::Heard, now);
                if f.handle(Input::Tick, now).contains(&Action::PollPrimary) {
                    return now;
                }
            }
            panic!("no poll within 2 s");
        };
        let t = until_poll(&mut f);
        assert_eq!(t, t0 + ms(500), "polls every poll_interval");
        assert!(f.handle(Input::Polled { good: true }, t).is_empty());
        let t = until_poll(&mut f);
        assert!(
            f.handle(Input::Polled { good: false }, t).is_empty(),
            "a bad poll resets the count"
        );
        let t = until_poll(&mut f);
        assert!(f.handle(Input::Polled { good: true }, t).is_empty());
        let t = until_poll(&mut f);
        assert_eq!(
            f.handle(Input::Polled { good: true }, t),
            vec![Action::Disconnect, Action::Connect(Member::Primary)]
        );
    }

    #[test]
    fn directives_are_obeyed_at_once() {
        let t0 = Instant::now();
        let mut f = connected_to(Member::Backup, t0);
        assert_eq!(
            f.handle(Input::Failback, t0),
            vec![Action::Disconnect, Action::Connect(Member::Primary)]
        );
        let mut f = connected_to(Member::Primary, t0);
        assert!(f.handle(Input::Failback, t0).is_empty(), "already there");
        assert_eq!(
            f.handle(Input::Leave, t0),
            vec![Action::Disconnect, Action::Connect(Member::Backup)]
        );
        let mut f = connected_to(Member::Primary, t0);
        assert_eq!(
            f.handle(Input::Redirect(Member::Backup), t0),
            vec![Action::Disconnect, Action::Connect(Member::Backup)]
        );
    }

    #[test]
    fn without_auto_return_it_stays_on_the_backup_until_told() {
        let t0 = Instant::now();
        let mut f = Failover::new(Settings {
            polls_to_return: 0,
            ..Settings::default()
        });
        f.handle(Input::Start, t0);
        f.handle(
            Input::ConnectFailed {
                member: Member::Primary,
                fatal: None,
            },
            t0,
        );
        f.handle(Input::Connected(Member::Backup), t0);
        for i in 1..50 {
            let now = t0 + ms(100 * i);
            f.handle(Input::Heard, now);
            assert!(!f.handle(Input::Tick, now).contains(&Action::PollPrimary));
        }
    }
}
