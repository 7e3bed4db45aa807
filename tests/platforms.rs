//! The adapter compliance suite (`faastastic::platform::compliance`) against every real
//! platform: local processes, Docker, Swarm (dockerd in a swarm, as `scripts/test.sh` sets
//! up) and a remote datacenter's agent. The fake platform runs it in the unit tests.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::docker::{build_image, require_docker, Image};
use common::{free_port, Agent, BIN};
use faastastic::config::Config;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docker_platform_complies() {
    require_docker();
    let dc = format!("comply{}", std::process::id());
    let image = Image(format!("faastastic-test/comply:{dc}"));
    build_image(&image.0);
    let dir = tempfile::tempdir().unwrap();
    let docker = DockerPlatform::connect(
        None,
        false,
        &dc,
        Config::default().docker,
        dir.path().join("run"),
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap();
    let platform = DockerHandle(docker);
    let result = suite(cat(Some(&image.0)), 60)
        .run(&platform, "docker-cat")
        .await;
    platform.shutdown().await;
    result.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swarm_platform_complies() {
    require_docker();
    let dc = format!("swcomply{}", std::process::id());
    let image = Image(format!("faastastic-test/swcomply:{dc}"));
    build_image(&image.0);
    let dir = tempfile::tempdir().unwrap();
    let swarm = SwarmPlatform::connect(
        None,
        &dc,
        Config::default().swarm,
        dir.path().join("run"),
        Arc::new(Metrics::new()),
    )
    .await
    .expect("a swarm manager (scripts/test.sh runs docker swarm init)");
    let platform = SwarmHandle(swarm);
    let result = suite(cat(Some(&image.0)), 120)
        .run(&platform, "swarm-cat")
        .await;
    platform.shutdown().await;
    result.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_agent_complies() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _agent = Agent::start("far", port, dir.path());
    let platform = RemotePlatform::new(
        &format!("http://127.0.0.1:{port}"),
        Some(&dir.path().join("token")),
        Duration::from_secs(10),
    )
    .unwrap();
    let result = suite(cat(None), 30).run(&*platform, "remote-cat").await;
    platform.shutdown().await;
    result.unwrap();
}
