//! `tandem store`: one aggregation store in the foreground.

use std::time::Duration;

use anyhow::Result;
use tandem_config::{PairFile, StoreRole, resolve};
use tandem_protocol::Role;
use tandem_store::StoreOptions;

use crate::args::Global;
use crate::runtime;

pub fn options(pair: &PairFile, global: &Global, name: Option<&str>) -> Result<StoreOptions> {
    let store = pair.select_store(name)?;
    Ok(StoreOptions {
        name: store.name.clone(),
        role: match store.role {
            StoreRole::Primary => Role::Primary,
            StoreRole::Backup => Role::Backup,
        },
        listen: store.listen.0,
        http: store.http.map(|a| a.0),
        data_path: resolve(&global.data_dir, &store.data_dir),
        max_frame: pair.pair.max_frame_bytes,
        max_connections: 10_000,
        clear_delete_after: Duration::from_secs(store.clear_delete_after_s),
        housekeeping: store.housekeeping,
        housekeeping_interval: Duration::from_secs(1),
        log_retention: store.log_retention_entries.max(1),
    })
}

pub fn run(pair: &PairFile, global: &Global, name: Option<&str>) -> Result<()> {
    let options = options(pair, global, name)?;
    runtime::runtime()?.block_on(async {
        let shutdown = runtime::shutdown_on_signal();
        let metrics = runtime::metrics();
        let store = options.name.clone();
        let data = options.data_path.display().to_string();
        tandem_store::run(options, metrics, shutdown, |listen, http| {
            let http = http.map_or("off".to_string(), |a| a.to_string());
            tracing::info!(store, %listen, http, data, "store ready");
        })
        .await?;
        Ok(())
    })
}
