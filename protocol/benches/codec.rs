//! Encode and decode a batch of 1,000 typical alerts: the codec's cost per event; and decode
//! them as a replicated batch of packed log blocks, as a backup store does.
//!
//! Run with `cargo bench -p tandem-protocol --bench codec`; criterion prints elements/s, which
//! is alerts/s each way.

// The allocator the tandem binary uses: decoding is an allocation per event, and the system
// allocator's costs (and its page faults) would be most of what this measured.
#[global_allocator]
static GLOBAL: tandem_alloc::MiMalloc = tandem_alloc::MiMalloc;

use std::collections::BTreeMap;
use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tandem_protocol::message::{LogBatch, LogEntry};
use tandem_protocol::{
    AlertFields, Event, EventBody, Kind, Message, MessageCodec, Origin, Severity,
};
use tokio_util::codec::{Decoder, Encoder};

fn typical_batch(n: u64) -> Message {
    let origin = Origin::new("syslog-probe-01", 0x5eed_0001);
    let events = (0..n)
        .map(|i| {
            let host = format!("web{:03}", i % 200);
            let mut extra = BTreeMap::new();
            extra.insert("datacenter".to_string(), "fra1".to_string());
            Event {
                origin: origin.clone(),
                seq: 1_000_000 + i,
                time: 1_790_000_000_000 + i as i64,
                body: EventBody::Occurrence(AlertFields {
                    identifier: format!("{host}:disk:/var:{}", i % 10),
                    node: host.clone(),
                    node_alias: format!("{host}.example.net"),
                    manager: "node-exporter".into(),
                    agent: "syslog".into(),
                    alert_group: "disk".into(),
                    alert_key: "/var".into(),
                    summary: format!(
                        "filesystem /var on {host} is 91% full (threshold 90%), growth 1.2 GiB/h, \
                         projected full in 3h40m; consider rotating /var/log/app/*.log event {i}"
                    ),
                    class: "filesystem".into(),
                    kind: Kind::Problem,
                    severity: Severity::MINOR,
                    expire_seconds: 3600,
                    extra,
                }.pack()),
            }
        })
        .collect();
    Message::Events { batch: 42, events }
}

fn codec(c: &mut Criterion) {
    let batch = typical_batch(1000);
    let mut codec = MessageCodec::default();
    let mut frame = BytesMut::new();
    codec.encode(&batch, &mut frame).expect("encodes");
    let frame = frame.freeze();
    eprintln!("frame of 1,000 alerts: {} bytes", frame.len());

    let mut group = c.benchmark_group("codec_1000_alerts");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("encode", |b| {
        let mut buf = BytesMut::with_capacity(frame.len() * 2);
        b.iter(|| {
            buf.clear();
            codec.encode(black_box(&batch), &mut buf).expect("encodes");
            black_box(buf.len())
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&frame[..]);
            black_box(
                codec
                    .decode(&mut buf)
                    .expect("decodes")
                    .expect("a whole frame"),
            )
        })
    });
    // What a store decodes with: each event's encoding kept as a range of the frame.
    let mut keeping = MessageCodec::default().keeping_record_bytes();
    group.bench_function("decode_keeping_encodings", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&frame[..]);
            let message = keeping
                .decode(&mut buf)
                .expect("decodes")
                .expect("a whole frame");
            black_box((message, keeping.take_record_bytes()))
        })
    });
    group.finish();

    // A peer's log as replication sends it: blocks of 256 entries, each compressed with LZ4.
    let Message::Events { events, .. } = batch else {
        unreachable!("typical_batch builds Events")
    };
    let mut replicated = LogBatch::default();
    for (block, lsns) in events.chunks(256).zip((1u64..).step_by(256)) {
        let mut stored = Vec::new();
        for (event, lsn) in block.iter().zip(lsns..) {
            let entry = LogEntry {
                lsn,
                source: "AGG_P".into(),
                source_serial: lsn,
                event: event.clone(),
            };
            let encoded = tandem_protocol::codec::to_bytes(&entry).expect("encodes");
            stored.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
            stored.extend_from_slice(&encoded);
        }
        let lz4 = lz4_flex::block::compress(&stored);
        replicated.push_packed(block.len() as u32, stored.len() as u32, &lz4);
    }
    let mut group = c.benchmark_group("replicated_1000_entries");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("decode_keeping_event_bytes", |b| {
        // The batch as a frame gives it: the copy is set up outside the measurement.
        b.iter_batched(
            || replicated.clone(),
            |batch| black_box(batch.decode_keeping_event_bytes().expect("decodes")),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
