//! The adapter compliance suite (`faastastic::platform::compliance`) against every real
//! platform: local processes, Docker and Swarm (dockerd in a swarm, as `scripts/test.sh` sets
//! up) in each of their ways to reach replicas, and a remote datacenter's agent. The fake
//! platform runs it in the unit tests.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::docker::{build_image, build_stock_image, require_docker, require_swarm, Image, Sweep};
use common::{free_port, Agent, BIN};
use faastastic::config::{Config, Reach};
use faastastic::model::FunctionDeployment;
use faastastic::platform::compliance::Suite;
use faastastic::platform::docker::{DockerHandle, DockerPlatform};
use faastastic::platform::local::LocalPlatform;
use faastastic::platform::remote::RemotePlatform;
use faastastic::platform::swarm::{SwarmHandle, SwarmPlatform};
use faastastic::platform::Platform;
use faastastic::telemetry::Metrics;

/// `cat` behind the watchdog: what every platform here can run.
fn cat(image: Option<&str>) -> FunctionDeployment {
    FunctionDeployment {
        image: Some(image.unwrap_or("faastastic/local").to_string()),
        env_process: Some("cat".to_string()),
        ..Default::default()
    }
}

fn suite(deployment: FunctionDeployment, settle_secs: u64) -> Suite {
    Suite {
        deployment,
        settle: Duration::from_secs(settle_secs),
        serves: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_platform_complies() {
    let dir = tempfile::tempdir().unwrap();
    let platform = LocalPlatform::new(
        Config::default().local,
        PathBuf::from(BIN),
        dir.path().join("run"),
        "comply",
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let result = suite(cat(None), 30).run(&platform, "local-cat").await;
    platform.shutdown().await;
    result.unwrap();
}

/// The docker platform with `reach`, running an image built as OpenFaaS templates build them
/// (it serves on 8080 whatever it is told and binds 8081 too).
async fn docker_complies(reach: Reach, name: &str) {
    require_docker();
    let dc = format!("{name}{}", std::process::id());
    let image = Image(format!("faastastic-test/comply:{dc}"));
    let _sweep = Sweep(dc.clone());
    build_stock_image(&image.0);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default().docker;
    cfg.reach = reach;
    let docker = DockerPlatform::connect(
        None,
        false,
        &dc,
        cfg,
        dir.path().join("run"),
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap();
    let platform = DockerHandle(docker);
    let result = suite(cat(Some(&image.0)), 60).run(&platform, name).await;
    platform.shutdown().await;
    result.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docker_platform_complies() {
    docker_complies(Reach::Published, "docker-cat").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docker_platform_complies_reaching_container_addresses() {
    docker_complies(Reach::Address, "docker-address").await;
}

/// The swarm platform with `reach`: published ports run the OpenFaaS-style image; slot
/// addresses need an image that listens where `faastastic_listen` says (faastastic's own).
async fn swarm_complies(reach: Reach, name: &str) {
    require_swarm();
    let dc = format!("sw{name}{}", std::process::id());
    let image = Image(format!("faastastic-test/swcomply:{dc}"));
    let _sweep = Sweep(dc.clone());
    match reach {
        Reach::Slot => build_image(&image.0),
        _ => build_stock_image(&image.0),
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default().swarm;
    cfg.reach = reach;
    let swarm = SwarmPlatform::connect(
        None,
        &dc,
        cfg,
        dir.path().join("run"),
        Arc::new(Metrics::new()),
    )
    .await
    .expect("a swarm manager (scripts/test.sh runs docker swarm init)");
    let platform = SwarmHandle(swarm);
    let result = suite(cat(Some(&image.0)), 120).run(&platform, name).await;
    platform.shutdown().await;
    result.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swarm_platform_complies() {
    swarm_complies(Reach::Published, "swarm-cat").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swarm_platform_complies_on_slot_addresses() {
    swarm_complies(Reach::Slot, "swarm-slot").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_agent_complies() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _agent = Agent::start("far", port, dir.path());
    let platform = RemotePlatform::new(
        &format!("http://127.0.0.1:{port}"),
        Some(&dir.path().join("token")),
        &Default::default(),
        Duration::from_secs(10),
    )
    .unwrap();
    let result = suite(cat(None), 30).run(&*platform, "remote-cat").await;
    platform.shutdown().await;
    result.unwrap();
}
