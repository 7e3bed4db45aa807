//! `faastastic serve`: wires config, store, platform, fleet and the HTTP surface together.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::api::auth::{resolve_credentials, Auth, CredentialSource};
use crate::api::{self, AppState};
use crate::autoscale::clock::SystemClock;
use crate::autoscale::executor::Autoscaler;
use crate::config::{Config, PlatformConfig};
use crate::fleet::{Datacenter, Fleet};

use crate::platform::local::LocalPlatform;
use crate::platform::Platform;
use crate::proxy::{Activity, Invoker};
use crate::queue::AsyncQueue;
use crate::store::Store;
use crate::telemetry::Metrics;

/// Creates the data directory owner-only, and makes everything created in it owner-only too
/// (the store and its WAL files hold secret values).
pub(crate) fn create_data_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make data directory {} private", dir.display()))
}

fn auth(cfg: &Config) -> anyhow::Result<Arc<Auth>> {
    if !cfg.auth.enabled {
        tracing::warn!(
            "authentication is OFF: anyone who can reach this port can deploy and run functions"
        );
        return Ok(Auth::disabled());
    }
    let (creds, source) = resolve_credentials(&cfg.auth, &cfg.data_dir)?;
    match source {
        CredentialSource::Configured => {
            println!("basic auth: user {:?}, password from configuration", creds.user)
        }
        CredentialSource::Stored(path) => println!(
            "basic auth: user {:?}, password in {}",
            creds.user,
            path.display()
        ),
        CredentialSource::Generated(path) => println!(
            "basic auth: generated a password for user {:?} in {} (log in with: cat {} | faas-cli login -u {} --password-stdin)",
            creds.user,
            path.display(),
            path.display(),
            creds.user
        ),
    }
    let bearer = match &cfg.autoscale.alert_bearer_token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| {
                    format!(
                        "cannot read autoscale.alert_bearer_token_file {}",
                        path.display()
                    )
                })?
                .trim()
                .to_string();
            anyhow::ensure!(
                !token.is_empty(),
                "autoscale.alert_bearer_token_file {} is empty",
                path.display()
            );
            crate::platform::isolation::warn_if_readable_by_others(
                path,
                "autoscale.alert_bearer_token_file",
            );
            Some(token)
        }
        None => None,
    };
    Ok(Auth::basic(&creds, bearer.as_deref()))
}

/// Everything `serve` runs, built from a config. Tests and benchmarks use it to drive the
/// real router in process; `state.fleet.shutdown()` stops every datacenter's replicas.
pub struct App {
    pub state: Arc<AppState>,
}

/// One platform per configured datacenter.
async fn datacenters(cfg: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Vec<Arc<Datacenter>>> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let mut out = Vec::new();
    for dc in &cfg.datacenters {
        let platform: Arc<dyn Platform> = match &dc.platform {
            PlatformConfig::Local => Arc::new(
                LocalPlatform::new(
                    cfg.local.clone(),
                    exe.clone(),
                    cfg.data_dir.join("run").join(&dc.name),
                    &dc.name,
                    metrics.clone(),
                )
                .with_context(|| format!("cannot prepare the local platform of {}", dc.name))?,
            ),
            PlatformConfig::Docker { socket, pull } => {
                Arc::new(crate::platform::docker::DockerHandle(
                    crate::platform::docker::DockerPlatform::connect(
                        socket.as_deref(),
                        *pull,
                        &dc.name,
                        cfg.docker.clone(),
                        cfg.data_dir.join("run").join(&dc.name),
                        metrics.clone(),
                    )
                    .await
                    .with_context(|| format!("cannot reach the Docker engine of {}", dc.name))?,
                ))
            }
            PlatformConfig::Swarm { socket } => Arc::new(crate::platform::swarm::SwarmHandle(
                crate::platform::swarm::SwarmPlatform::connect(
                    socket.as_deref(),
                    &dc.name,
                    cfg.swarm.clone(),
                    cfg.data_dir.join("run").join(&dc.name),
                    metrics.clone(),
                )
                .await
                .with_context(|| format!("cannot reach the swarm manager of {}", dc.name))?,
            )),
            PlatformConfig::Remote {
                url,
                token_file,
                tls,
            } => crate::platform::remote::RemotePlatform::new(
                url,
                token_file.as_deref(),
                tls,
                dc.timeout,
            )
            .with_context(|| format!("cannot prepare the remote platform of {}", dc.name))?,
        };
        tracing::info!(datacenter = %dc.name, platform = dc.platform.kind(), home = dc.home, "datacenter");
        out.push(Arc::new(Datacenter::new(
            &dc.name,
            platform,
            dc.timeout,
            dc.rate_per_sec,
        )));
    }
    Ok(out)
}

/// Builds the store, platform, fleet, autoscaler (with its ticker) and HTTP state.
pub async fn build(cfg: &Config) -> anyhow::Result<App> {
    create_data_dir(&cfg.data_dir)?;
    let metrics = Arc::new(Metrics::new());
    if cfg.store.is_some() {
        // Replicas other instances can see and serve: an agent's, which it reports to every
        // instance that asks. The local platform's are processes of one instance, and the
        // docker and swarm platforms track (and at start clear) what their instance created.
        if let Some(dc) = cfg
            .datacenters
            .iter()
            .find(|d| !matches!(d.platform, PlatformConfig::Remote { .. }))
        {
            anyhow::bail!(
                "[store] url is a shared store, but datacenter {} runs functions through this instance alone (platform \"{}\"): give instances on a shared store datacenters run by agents (platform \"remote\", with `faastastic agent` there)",
                dc.name,
                dc.platform.kind()
            );
        }
    }
    let store = match &cfg.store {
        Some(shared) => Store::new(Arc::new(
            crate::store::PostgresStore::connect(shared).await?,
        )),
        None => Store::open(&cfg.data_dir.join("state.db"))
            .with_context(|| format!("cannot open the store in {}", cfg.data_dir.display()))?,
    };
    let leader = match &cfg.store {
        Some(shared) => crate::store::Leader::candidate(store.clone(), shared.lease),
        None => crate::store::Leader::sole(),
    };
    let fleet = Arc::new(
        Fleet::restore(
            store.clone(),
            datacenters(cfg, &metrics).await?,
            cfg.home(),
            cfg.placement,
            &cfg.default_namespace,
            cfg.limits.max_replicas,
            Arc::new(cfg.autoscale.clone()),
        )
        .await?
        .with_leader(leader.clone()),
    );
    leader.spawn(metrics.clone());
    spawn_pruning(
        store.clone(),
        leader.clone(),
        cfg.events.clone(),
        std::time::Duration::from_secs(3600),
    );
    fleet.spawn_reconciler(cfg.reconcile_interval);
    let activity = Arc::new(Activity::default());
    let autoscaler = Autoscaler::restore(
        fleet.clone(),
        store.clone(),
        metrics.clone(),
        activity.clone(),
        crate::grafana::Annotations::start(&cfg.grafana, metrics.clone())?,
        cfg.autoscale.clone(),
        Arc::new(SystemClock),
    )
    .await?;
    crate::autoscale::follow::spawn(&store, fleet.clone(), autoscaler.clone());
    crate::autoscale::follow::spawn_counters(
        &store,
        leader.id.clone(),
        metrics.clone(),
        activity.clone(),
    );
    // Waking a function from zero is the autoscaler's decision, like every replica change.
    let invoker = Arc::new(Invoker::new(
        fleet.clone(),
        metrics.clone(),
        activity,
        autoscaler.clone(),
        cfg.proxy.clone(),
    ));
    let queue = Arc::new(AsyncQueue::start(
        invoker.clone(),
        metrics.clone(),
        &cfg.async_invoke,
    ));
    autoscaler.spawn_ticker();
    if !cfg.cron.enabled {
        tracing::info!("cron: off ([triggers.cron] enabled = false): no schedule runs here");
    }
    crate::triggers::cron::CronScheduler::new(
        fleet.clone(),
        invoker.clone(),
        store.clone(),
        metrics.clone(),
        cfg.cron.enabled,
    )
    .spawn();
    let nats = cfg.nats.as_ref().map(|nats| {
        let triggers = crate::triggers::nats::NatsTriggers::new(
            nats.clone(),
            fleet.clone(),
            invoker.clone(),
            metrics.clone(),
        );
        triggers.clone().spawn();
        triggers
    });
    crate::autoscale::query::spawn_all(
        &cfg.autoscale.queries,
        &cfg.prometheus,
        nats.map(|n| n as Arc<dyn crate::autoscale::query::Backlog>),
        fleet.clone(),
        autoscaler.clone(),
        metrics.clone(),
    )?;
    let webhook_rate =
        NonZeroU32::new(cfg.autoscale.webhook_rate_per_sec.max(1)).expect("max(1) is non-zero");
    let state = Arc::new(AppState {
        fleet,
        invoker,
        queue,
        metrics,
        role: cfg.role,
        limits: cfg.limits.clone(),
        autoscaler,
        fleet_store: store,
        statuses: Default::default(),
        webhook_limiter: governor::RateLimiter::direct(
            governor::Quota::per_second(webhook_rate).allow_burst(
                webhook_rate.saturating_mul(NonZeroU32::new(2).expect("2 is non-zero")),
            ),
        ),
    });

    Ok(App { state })
}

pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let auth = {
        create_data_dir(&cfg.data_dir)?;
        auth(&cfg)?
    };
    // Read before anything starts: a certificate that does not load stops the start, named.
    let tls = cfg
        .tls
        .as_ref()
        .map(crate::tls::acceptor)
        .transpose()
        .context("[tls]")?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let App { state } = build(&cfg).await?;

    if let Some(addr) = cfg.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (metrics.listen)"))?;
        println!(
            "faastastic metrics on {scheme}://{}",
            listener.local_addr()?
        );
        let app = api::monitoring_router(state.clone());
        tokio::spawn(crate::listener::serve(
            listener,
            app,
            (&cfg.limits).into(),
            crate::listener::Lanes::SHARED,
            tls.clone(),
            std::future::pending(),
            crate::listener::DRAIN,
        ));
    }

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", cfg.listen))?;
    println!(
        "faastastic listening on {scheme}://{}",
        listener.local_addr()?
    );
    let fleet = state.fleet.clone();
    let lane = cfg.proxy.lane.then(|| {
        Arc::new(crate::lane::Lane::new(
            state.invoker.clone(),
            cfg.limits.header_timeout,
            cfg.limits.idle_timeout,
        ))
    });
    let app = api::router(state, auth);
    crate::listener::serve(
        listener,
        app,
        (&cfg.limits).into(),
        crate::listener::Lanes::invocations(cfg.proxy.connection_threads, lane),
        tls,
        crate::listener::shutdown_signal(),
        crate::listener::DRAIN,
    )
    .await;
    // Another instance takes over now rather than when the lease runs out.
    fleet.leader().resign().await;
    tracing::info!("stopping replicas");
    fleet.shutdown().await;
    Ok(())
}

/// Keeps the audit trail within `[events]`: prunes on the leader only (every instance would
/// delete the same rows), as it starts leading (at start with the embedded store) and then
/// every `every`. A failure is logged and tried again at the next turn; nothing else waits
/// for it.
fn spawn_pruning(
    store: crate::store::Store,
    leader: std::sync::Arc<crate::store::Leader>,
    bounds: crate::config::EventsConfig,
    every: std::time::Duration,
) {
    if bounds.retention_days == 0 && bounds.max_per_function == 0 {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changes = leader.watch();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if !*changes.borrow_and_update() {
                        continue;
                    }
                    // A new term: pruned now, then every `every` from here.
                    tick.reset();
                }
            }
            if !leader.is_leader() {
                continue;
            }
            match store.prune_events(&bounds, chrono::Utc::now()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    removed = n,
                    retention_days = bounds.retention_days,
                    max_per_function = bounds.max_per_function,
                    "audit trail pruned"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prune the audit trail; trying again later")
                }
            }
        }
    });
}
