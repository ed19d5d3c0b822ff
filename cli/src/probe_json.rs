//! `tandem probe json`: a long-running JSON-lines probe.
//!
//! It reads a file (or standard input) and sends each alert line through the pair. With
//! `--follow` it keeps reading what is appended, like `tail -F`: when the file is replaced
//! (another inode, as log rotation does) or truncated, it starts on the new file from its top.
//! How far it has read is stored in the spool with the events read up to there, so a restarted
//! probe with a disk spool resumes where it stopped (on the same file) without sending a line
//! twice or skipping one.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tandem_config::PairFile;
use tandem_probe::pair::PairClient;
use tandem_protocol::EventBody;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{alert_json, probe_config, runtime};

/// How often a followed file is checked for new lines when there were none.
const POLL: Duration = Duration::from_millis(100);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where reading stands: the file's inode and the offset after the last line read.
fn cursor(inode: u64, offset: u64) -> Vec<u8> {
    let mut c = inode.to_be_bytes().to_vec();
    c.extend_from_slice(&offset.to_be_bytes());
    c
}

fn parse_cursor(c: &[u8]) -> Option<(u64, u64)> {
    let inode = u64::from_be_bytes(c.get(..8)?.try_into().ok()?);
    let offset = u64::from_be_bytes(c.get(8..16)?.try_into().ok()?);
    Some((inode, offset))
}

/// Lines of a followed file with the cursor after each; ends only when `stop` is cancelled.
fn follow(
    path: PathBuf,
    start: Option<(u64, u64)>,
    lines: mpsc::Sender<(String, Vec<u8>)>,
    stop: CancellationToken,
) -> Result<()> {
    let mut resume = start;
    while !stop.is_cancelled() {
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(_) => {
                // Not there yet, or between a rotation's rename and create.
                std::thread::sleep(POLL);
                continue;
            }
        };
        let inode = file.metadata().map(|m| m.ino()).unwrap_or(0);
        let mut offset = match resume.take() {
            Some((i, o))
                if i == inode && file.metadata().map(|m| m.len() >= o).unwrap_or(false) =>
            {
                o
            }
            _ => 0,
        };
        let mut reader = BufReader::new(file);
        reader.seek(SeekFrom::Start(offset))?;
        let mut line = String::new();
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n > 0 && line.ends_with('\n') {
                offset += n as u64;
                let text = line.trim_end().to_string();
                if lines.blocking_send((text, cursor(inode, offset))).is_err() {
                    return Ok(());
                }
                continue;
            }
            // A partial last line waits for the rest of it.
            if n > 0 {
                reader.seek(SeekFrom::Start(offset))?;
            }
            let replaced = std::fs::metadata(&path)
                .map(|m| m.ino() != inode || m.len() < offset)
                .unwrap_or(true);
            if replaced {
                tracing::info!(file = %path.display(), "file replaced or truncated; reading the new one");
                break;
            }
            std::thread::sleep(POLL);
        }
    }
    Ok(())
}

pub fn run(pair: &PairFile, data_dir: &Path, follow_file: bool, file: Option<&Path>) -> Result<()> {
    let name = probe_config::instance_name("json", file);
    let config = probe_config::pair_config(pair, data_dir, &name)?;
    let spool = probe_config::open_spool(pair, data_dir, &name)?;
    let start = spool.source_cursor().and_then(parse_cursor);
    runtime::runtime()?.block_on(async move {
        let shutdown = runtime::shutdown_on_signal();
        let client = PairClient::start(config, spool);
        let (tx, mut rx) = mpsc::channel::<(String, Vec<u8>)>(1024);
        let stop = shutdown.child_token();
        let reader = match (file, follow_file) {
            (Some(path), true) => {
                let path = path.to_path_buf();
                let stop = stop.clone();
                tokio::task::spawn_blocking(move || follow(path, start, tx, stop))
            }
            (path, _) => {
                let input: Box<dyn BufRead + Send> = match path {
                    Some(p) => Box::new(BufReader::new(
                        std::fs::File::open(p)
                            .with_context(|| format!("cannot read {}", p.display()))?,
                    )),
                    None => Box::new(BufReader::new(std::io::stdin())),
                };
                tokio::task::spawn_blocking(move || {
                    for (n, line) in input.lines().enumerate() {
                        let line = line?;
                        if tx
                            .blocking_send((line, (n as u64 + 1).to_be_bytes().to_vec()))
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(())
                })
            }
        };
        tracing::info!(probe = %name, "probe running");
        let mut read = 0u64;
        loop {
            let next = tokio::select! {
                next = rx.recv() => next,
                _ = shutdown.cancelled() => None,
            };
            let Some((line, at)) = next else { break };
            if line.trim().is_empty() {
                continue;
            }
            read += 1;
            match alert_json::parse(&line) {
                Ok((fields, time)) => {
                    let body = vec![EventBody::Occurrence(fields.pack())];
                    let pushed = client
                        .push(time.unwrap_or_else(now_ms), body, Some(at.clone()))
                        .await;
                    // An alert the pair cannot carry is a bad line, not the probe's end.
                    if let Err(tandem_probe::pair::PairError::Spool(
                        e @ tandem_probe::spool::SpoolError::TooLarge { .. },
                    )) = &pushed
                    {
                        tracing::warn!(line = read, "skipped: {e}");
                        client.push(now_ms(), Vec::new(), Some(at)).await?;
                    } else {
                        pushed?;
                    }
                }
                Err(e) => {
                    tracing::warn!(line = read, "skipped: {e}");
                    client.push(now_ms(), Vec::new(), Some(at)).await?;
                }
            }
        }
        stop.cancel();
        let _ = reader.await;
        let mut client = client;
        let waited = client.wait_acked(Duration::from_secs(5)).await;
        let stats = client.stats();
        client.close().await;
        tracing::info!(
            read,
            acked = stats.acked,
            pending = stats.pending,
            failovers = stats.failovers,
            "probe stopped"
        );
        if let Err(e) = waited {
            tracing::warn!("{e}; the unacknowledged events stay in the spool for the next run");
        }
        Ok(())
    })
}
