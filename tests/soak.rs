//! A bounded soak: invocations, alerts that scale up and down, deploys, updates and removals,
//! secrets, event and metric reads, all at once for `SOAK_SECS` seconds (default 40; run it
//! longer by hand). The server's resident memory and open file descriptors (established
//! connections aside: they follow the load) are sampled every second and must stay flat: after
//! a warm-up, the median of the last third of the run may not exceed that of the first third by
//! more than the band below. Every invocation of a function that stays deployed must succeed,
//! no connection its peer closed stays open, and removed functions leave no process behind.

mod common;

use std::time::{Duration, Instant};

use common::{echo_function, replica_pids, Load, Server};
use reqwest::Method;
use serde_json::json;

/// Allowed growth from the first third of the run to the last.
const RSS_BAND: f64 = 1.25;
const RSS_SLACK_KB: u64 = 16 * 1024;
/// Descriptors other than established connections (those follow the load's peak concurrency,
/// held open by the test client's and the lane's pools) may grow this much: replicas' pipes
/// as `scaled` goes up and down, a connection closing at the moment of a sample.
const FD_SLACK: usize = 24;

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// The state (`/proc/net/tcp`'s hex code) of every TCP socket in the process's network
/// namespace, by inode.
fn tcp_states(pid: u32) -> std::collections::HashMap<u64, u8> {
    let mut states = std::collections::HashMap::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let (Some(state), Some(inode)) = (fields.get(3), fields.get(9)) {
                if let (Ok(state), Ok(inode)) = (u8::from_str_radix(state, 16), inode.parse()) {
                    states.insert(inode, state);
                }
            }
        }
    }
    states
}

const ESTABLISHED: u8 = 0x01;
const CLOSE_WAIT: u8 = 0x08;

/// The process's open descriptors: how many are not established TCP connections, and how
/// many are connections its peer closed and it did not (`CLOSE_WAIT`).
fn open_fds(pid: u32) -> (usize, usize) {
    let states = tcp_states(pid);
    let (mut other, mut close_wait) = (0, 0);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue; // closed since it was listed
        };
        let state = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
            .and_then(|inode: u64| states.get(&inode).copied());
        match state {
            Some(ESTABLISHED) => {}
            Some(CLOSE_WAIT) => {
                close_wait += 1;
                other += 1;
            }
            _ => other += 1,
        }
    }
    (other, close_wait)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_descriptors_stay_flat_under_mixed_load() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let run = Duration::from_secs(secs.max(9));
    let mut s = Server::start();
    let pid = s.pid();
    for name in ["steady", "scaled"] {
        let mut f = echo_function(name);
        f["labels"] = json!({"com.openfaas.scale.max": "3"});
        assert_eq!(s.deploy(f).await.status(), 202);
        s.wait_available(name, 1).await;
    }
    let loads = [
        Load::start(&s, "steady", 200, run),
        Load::start(&s, "scaled", 200, run),
    ];

    let start = Instant::now();
    let mut samples: Vec<(u64, usize)> = Vec::new();
    let mut next_sample = start;
    let mut round = 0u32;
    while start.elapsed() < run {
        round += 1;
        // An alert that fires, then resolves: scaled goes up and comes back down.
        let status = if round % 2 == 1 { "firing" } else { "resolved" };
        let alert = common::alert_payload(
            status,
            &format!("s{}", round.div_ceil(2)),
            json!({"alertname": "Busy", "function_name": "scaled"}),
        );
        let r = s.post_alert(&alert).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        // A function that comes and goes, updated once in between.
        let churn = format!("churn{}", round % 3);
        assert_eq!(s.deploy(echo_function(&churn)).await.status(), 202);
        let mut updated = echo_function(&churn);
        updated["envVars"] = json!({"ROUND": round.to_string()});
        assert_eq!(s.update(&updated).await, 202);
        let secret = json!({"name": "soak", "value": format!("v{round}")});
        let r = s
            .system(Method::POST, "/system/secrets")
            .json(&secret)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let _: serde_json::Value = s.get_json("/system/scale-events?limit=50").await;
        let _ = s.metrics().await;
        assert_eq!(s.remove(&churn).await, 202);
        let r = s
            .system(Method::DELETE, "/system/secrets")
            .json(&json!({"name": "soak"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        if Instant::now() >= next_sample {
            samples.push((rss_kb(pid), open_fds(pid).0));
            next_sample += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut failed = 0;
    let mut sent = 0;
    for load in loads {
        failed += load.failed();
        sent += load.stop().await;
    }
    assert!(s.is_alive(), "the server died under the soak");
    assert!(sent > 0 && samples.len() >= 9, "{sent} sent, {samples:?}");
    assert_eq!(failed, 0, "{failed} of {sent} invocations failed");

    // Flat: the first second is the warm-up; compare the first and last thirds of the rest.
    let rest = &samples[1..];
    let third = rest.len() / 3;
    // Medians: a burst of open connections at one sample is not a leak.
    let median = |s: &[(u64, usize)]| {
        let mut rss: Vec<u64> = s.iter().map(|x| x.0).collect();
        let mut fds: Vec<usize> = s.iter().map(|x| x.1).collect();
        rss.sort_unstable();
        fds.sort_unstable();
        (rss[rss.len() / 2], fds[fds.len() / 2])
    };
    let (rss_early, fds_early) = median(&rest[..third]);
    let (rss_late, fds_late) = median(&rest[rest.len() - third..]);
    eprintln!(
        "soak: {secs} s, {round} rounds, {sent} invocations; RSS {rss_early} → {rss_late} kB, fds {fds_early} → {fds_late}"
    );
    assert!(
        rss_late as f64 <= rss_early as f64 * RSS_BAND + RSS_SLACK_KB as f64,
        "RSS grew from {rss_early} kB to {rss_late} kB: {samples:?}"
    );
    assert!(
        fds_late <= fds_early + FD_SLACK,
        "open descriptors grew from {fds_early} to {fds_late}: {samples:?}"
    );
    // Every connection a peer closed is closed by the server too, once the load is over.
    let closed = common::poll(Duration::from_secs(10), || async { open_fds(pid).1 == 0 }).await;
    assert!(
        closed,
        "{} connections closed by their peer stay open in the server",
        open_fds(pid).1
    );
    // Only the kept functions' replicas remain: removed functions and scaled-in replicas
    // left no process behind.
    let desired = || async {
        let mut n = 0;
        for name in ["steady", "scaled"] {
            n += s.status(name).await.1["replicas"].as_u64().unwrap();
        }
        n as usize
    };
    let settled = common::poll(Duration::from_secs(30), || async {
        replica_pids(pid).len() == desired().await
    })
    .await;
    assert!(
        settled,
        "{} replica processes under the server for {} replicas",
        replica_pids(pid).len(),
        desired().await
    );
}
