//! In-memory apply throughput: 10,000 identifiers, 90 % of events deduplicate into an alert
//! that exists (the other 10 % insert). No I/O: this is the fold and the table alone.
//!
//! `cargo bench -p tandem-store --bench apply`; criterion reports elements/s = events/s.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tandem_protocol::{AlertFields, Event, EventBody, Origin, Severity};
use tandem_store::table::{Changes, Table};

const EVENTS: u64 = 100_000;
const IDENTIFIERS: u64 = 10_000;

fn events() -> Vec<Event> {
    let origin = Origin::new("bench-probe", 1);
    (1..=EVENTS)
        .map(|seq| {
            // The first 10,000 events insert, the remaining 90,000 deduplicate.
            let id = seq % IDENTIFIERS;
            Event {
                origin: origin.clone(),
                seq,
                time: 1_700_000_000_000 + seq as i64,
                body: EventBody::Occurrence(
                    AlertFields {
                        identifier: format!("host{:05}:disk", id),
                        node: format!("host{:05}", id),
                        alert_key: "/var".into(),
                        alert_group: "disk".into(),
                        manager: "bench".into(),
                        summary: format!("/var on host{id:05} is 91% full"),
                        severity: Severity::MINOR,
                        ..AlertFields::default()
                    }
                    .pack(),
                ),
            }
        })
        .collect()
}

fn apply(c: &mut Criterion) {
    let events = events();
    let mut group = c.benchmark_group("apply_in_memory");
    group.throughput(Throughput::Elements(EVENTS));
    group.sample_size(20);
    group.bench_function("10k_ids_90pct_dups", |b| {
        // Events are owned by the apply (their fields move into the table), so each run
        // gets a fresh copy made outside the timing.
        b.iter_batched(
            || (Table::new("AGG_P"), events.clone()),
            |(mut table, events)| {
                let mut changes = Changes::default();
                for event in events {
                    black_box(table.apply(event, None, &mut changes));
                }
                (table, changes)
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);
