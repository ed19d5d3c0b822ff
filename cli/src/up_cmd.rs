//! `tandem up`: the whole pair on this machine for a first run.
//!
//! Each component runs as its own `tandem` process, as in production, so that killing one
//! (to watch a failover) leaves the others running. Their logs are passed through with the
//! component's name in front. Ctrl-C or SIGTERM stops them all: each gets SIGTERM, and one that
//! has not stopped within ten seconds is killed.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tandem_config::PairFile;

use crate::args::Global;
use crate::runtime;

struct Component {
    name: String,
    child: Child,
}

fn spawn(global: &Global, kind: &str, name: &str) -> Result<Component> {
    let exe = std::env::current_exe().context("cannot find the tandem executable to start")?;
    let mut cmd = Command::new(exe);
    cmd.arg(kind).arg("--name").arg(name);
    if let Some(config) = &global.config {
        cmd.arg("--config").arg(config);
    }
    cmd.arg("--data-dir")
        .arg(&global.data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {kind} {name}"))?;
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let prefix = format!("{name:>8} | ");
        // Ends when the child closes its output, that is when it exits.
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                tell!("{prefix}{line}");
            }
        });
    }
    Ok(Component {
        name: name.to_string(),
        child,
    })
}

fn stop(components: &mut [Component]) {
    for c in components.iter() {
        if let Ok(pid) = i32::try_from(c.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in components.iter_mut() {
        loop {
            match c.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    tell!("tandem up: {} did not stop within 10 s; killing it", c.name);
                    let _ = c.child.kill();
                    let _ = c.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

pub fn run(pair: &PairFile, global: &Global) -> Result<()> {
    std::fs::create_dir_all(&global.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            global.data_dir.display()
        )
    })?;
    let mut components = Vec::new();
    let mut start = |kind: &str, name: &str| -> Result<()> {
        components.push(spawn(global, kind, name)?);
        Ok(())
    };
    let started: Result<()> = (|| {
        for store in &pair.stores {
            start("store", &store.name)?;
        }
        for proxy in &pair.proxies {
            start("proxy", &proxy.name)?;
        }
        for gateway in &pair.gateways {
            start("gateway", &gateway.name)?;
        }
        Ok(())
    })();
    if let Err(e) = started {
        stop(&mut components);
        return Err(e);
    }
    print_map(pair, &global.data_dir);

    let rt = runtime::runtime()?;
    let result = rt.block_on(async {
        let shutdown = runtime::shutdown_on_signal();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    for c in components.iter_mut() {
                        if let Ok(Some(status)) = c.child.try_wait() {
                            // Left down on purpose: the pair is built to ride out a dead member;
                            // restart it by hand (tandem store|proxy --name ...) to watch it come back.
                            tell!("tandem up: {} exited ({status}); the rest of the pair keeps running", c.name);
                            c.name.push_str(" (exited)");
                        }
                    }
                    components.retain(|c| !c.name.ends_with(" (exited)"));
                    if components.is_empty() {
                        anyhow::bail!("every component has exited");
                    }
                }
            }
        }
    });
    stop(&mut components);
    result
}

fn print_map(pair: &PairFile, data_dir: &Path) {
    say!(
        "tandem pair {} is starting (data in {}):",
        pair.pair.name,
        data_dir.display()
    );
    for s in &pair.stores {
        let http = s.http.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        say!(
            "  store {:<8} {:<8} listen {:<16} http {http}",
            s.name,
            format!("{:?}", s.role).to_lowercase(),
            s.listen.to_string()
        );
    }
    for p in &pair.proxies {
        let http = p.http.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        say!(
            "  proxy {:<8} -> {:<6} listen {:<16} http {http}",
            p.name,
            p.store,
            p.listen.to_string()
        );
    }
    for g in &pair.gateways {
        let http = g.http.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        say!(
            "  gateway {:<6} {} <-> {}  http {http}",
            g.name,
            pair.primary_store().name,
            pair.backup_store().name
        );
    }
    say!("");
    say!("Send a first alert:");
    say!(
        "  echo '{{\"identifier\":\"web1:ping\",\"node\":\"web1\",\"summary\":\"web1 does not answer\",\"severity\":5}}' | tandem send"
    );
    say!("  tandem alerts --name {}", pair.primary_store().name);
    say!("Ctrl-C stops the pair.");
}
