//! `faastastic demo`: the whole loop on the embedded default, with nothing else installed.
//! Starts a server on a loopback port (auth off, a temporary data directory) with three local
//! datacenters (stage, lon, syd), deploys a hello-world function in all three, invokes it in
//! each, drives a bounded load against lon while the autoscaler (an internal query policy: 10
//! invocations/s per replica) takes lon from 1 to 4 replicas, stops the load and watches lon
//! step back down. Prints a live timeline and the decisions with their reasons, writes the
//! timeline as JSON, CSV and SVG, and succeeds only if lon scaled up and only lon did.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{Config, QueryPolicy, QuerySource};
use crate::server;

pub struct DemoOptions {
    /// Load in requests per second.
    pub rate: u64,
    /// Longest the load runs (it stops earlier once 4 replicas are ready for a few seconds).
    pub max_load: Duration,
    /// Where the timeline files go (default: the temporary data directory, kept).
    pub out: Option<PathBuf>,
    /// Scale through real Prometheus and Alertmanager (started from these programs, with the
    /// shipped rule and route) instead of the internal query policy.
    pub alerts: Option<AlertPath>,
    /// Keep the server (and its web UI) up after the run, until Ctrl-C.
    pub keep: bool,
}

/// The programs of the alert path.
pub struct AlertPath {
    pub prometheus: String,
    pub alertmanager: String,
}

/// A helper process killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const SHIPPED_RULES: &str = include_str!("../../rules/faastastic.rules.yml");
const SHIPPED_ROUTE: &str = include_str!("../../rules/alertmanager.yml");

/// Starts Alertmanager (the shipped route, delivering to `base`) and Prometheus (scraping
/// `base` every second, the shipped rules), and waits until Prometheus has scraped once.
async fn start_alert_path(
    path: &AlertPath,
    dir: &std::path::Path,
    base: &str,
) -> anyhow::Result<Vec<Child>> {
    let free = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (prom_port, am_port) = (free()?, free()?);
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("password"), "unused: the demo runs without auth\n")?;
    std::fs::write(
        dir.join("alertmanager.yml"),
        SHIPPED_ROUTE
            .replace("http://127.0.0.1:8080", base)
            .replace(
                "/var/lib/faastastic/basic-auth-password",
                &dir.join("password").display().to_string(),
            ),
    )?;
    std::fs::write(dir.join("faastastic.rules.yml"), SHIPPED_RULES)?;
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [\"{}\"]\nalerting:\n  alertmanagers:\n  - static_configs:\n    - targets: [\"127.0.0.1:{am_port}\"]\nscrape_configs:\n- job_name: faastastic\n  static_configs:\n  - targets: [\"{}\"]\n",
            dir.join("faastastic.rules.yml").display(),
            base.trim_start_matches("http://")
        ),
    )?;
    let spawn = |program: &str, args: Vec<String>| -> anyhow::Result<Child> {
        Ok(Child(
            std::process::Command::new(program)
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .with_context(|| format!("cannot start {program} (apt-get install prometheus prometheus-alertmanager)"))?,
        ))
    };
    let children = vec![
        spawn(
            &path.alertmanager,
            vec![
                format!("--config.file={}", dir.join("alertmanager.yml").display()),
                format!("--storage.path={}", dir.join("am").display()),
                format!("--web.listen-address=127.0.0.1:{am_port}"),
                "--cluster.listen-address=".to_string(),
            ],
        )?,
        spawn(
            &path.prometheus,
            vec![
                format!("--config.file={}", dir.join("prometheus.yml").display()),
                format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
                format!("--web.listen-address=127.0.0.1:{prom_port}"),
                "--rules.alert.resend-delay=1s".to_string(),
            ],
        )?,
    ];
    let http = reqwest::Client::new();
    let up =
        format!("http://127.0.0.1:{prom_port}/api/v1/query?query=up%7Bjob%3D%22faastastic%22%7D");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let scraped = match http.get(&up).send().await {
            Ok(r) => r
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| Some(!v["data"]["result"].as_array()?.is_empty()))
                .unwrap_or(false),
            Err(_) => false,
        };
        let am_ready = http
            .get(format!("http://127.0.0.1:{am_port}/-/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if scraped && am_ready {
            break;
        }
        if Instant::now() > deadline {
            bail!("Prometheus and Alertmanager did not start within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "Prometheus on 127.0.0.1:{prom_port} (rules/faastastic.rules.yml, scrape every 1 s), Alertmanager on 127.0.0.1:{am_port} (rules/alertmanager.yml)"
    );
    Ok(children)
}

/// A decision to mark on the plot: seconds since the load started, and its label.
#[derive(Debug, Clone, Serialize)]
struct Marker {
    t_secs: f64,
    label: String,
}

/// The datacenters of the demo, the loaded one first after home.
const DATACENTERS: [&str; 3] = ["stage", "lon", "syd"];
const LOADED: &str = "lon";

#[derive(Debug, Clone, Serialize)]
struct Point {
    t_secs: f64,
    phase: &'static str,
    /// Replicas of the loaded datacenter (lon).
    replicas: u64,
    ready: u64,
    /// Ready replicas of the other datacenters.
    stage_ready: u64,
    syd_ready: u64,
    requests_per_sec: f64,
    p99_ms: f64,
    errors: u64,
}

fn demo_config(data_dir: PathBuf, alerts: bool) -> Config {
    let mut cfg = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir,
        ..Default::default()
    };
    cfg.auth.enabled = false;
    cfg.datacenters = DATACENTERS
        .iter()
        .enumerate()
        .map(|(i, dc)| crate::config::DatacenterConfig::local(dc, i == 0))
        .collect();
    let a = &mut cfg.autoscale;
    // The way up is the shipped defaults' (a target and nothing else on the query policy
    // below); the way down is shortened, so that the demo ends within a minute.
    a.defaults.down_cooldown = Some(Duration::from_secs(2));
    a.defaults.stabilization_window = Some(Duration::from_secs(4));
    a.tick_interval = Duration::from_millis(250);
    if alerts {
        return cfg;
    }
    a.queries.push(QueryPolicy {
        name: "demo-rate".to_string(),
        source: QuerySource::Internal {
            window: Duration::from_secs(10),
        },
        pattern: glob::Pattern::new("*").expect("* is a valid glob"),
        strategy: crate::autoscale::strategy::Strategy::Target {
            target: 10.0,
            per_replica: false,
            tolerance: 0.1,
        },
        interval: Duration::from_secs(2),
        fallback_replicas: None,
        function_label: "function_name".to_string(),
        datacenter_label: "datacenter".to_string(),
        short_window: Some(crate::config::SHORT_WINDOW),
    });
    cfg
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let tmp = std::env::temp_dir().join(format!("faastastic-demo-{}", std::process::id()));
    let cfg = demo_config(tmp.join("data"), opts.alerts.is_some());
    // The server's data and the alerting programs' files go when the demo ends, however it
    // ends; only the timeline stays (in `tmp` when no --out is given, else `tmp` goes too).
    let mut remove = vec![tmp.join("data"), tmp.join("alerting")];
    if opts.out.is_some() {
        remove.push(tmp.clone());
    }
    let _cleanup = RemoveOnDrop(remove);
    match &opts.alerts {
        None => println!("faastastic demo: three datacenters (stage, lon, syd) on the embedded local platform, an internal query policy (10 invocations/s per replica), nothing else installed"),
        Some(_) => println!("faastastic demo: three datacenters (stage, lon, syd) on the embedded local platform, scaled by real Prometheus and Alertmanager with the shipped rule and route (5 invocations/s per replica)"),
    }
    let app = server::build(&cfg).await?;
    let router = crate::api::router(app.state.clone(), crate::api::auth::Auth::disabled())
        .layer(axum::middleware::from_fn(loopback_names_only));
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    println!("server on {base} (data in {})", cfg.data_dir.display());
    println!("watch it in the web UI: {base}/ui/#/function/hello/openfaas-fn");
    let http = reqwest::Client::new();
    let _alert_path = match &opts.alerts {
        Some(path) => match start_alert_path(path, &tmp.join("alerting"), &base).await {
            Ok(children) => Some(children),
            Err(e) => {
                app.state.fleet.shutdown().await;
                return Err(e);
            }
        },
        None => None,
    };

    let result = drive(&http, &base, &opts).await;
    let verdict = match result {
        Ok((timeline, markers, scaled_up)) => {
            report(&timeline, &markers, scaled_up, opts.out.unwrap_or(tmp))
        }
        Err(e) => Err(e),
    };
    if opts.keep {
        if let Err(e) = &verdict {
            eprintln!("demo failed: {e:#}");
        }
        println!("--keep: the server stays up; the web UI is at {base}/ui/ (Ctrl-C ends it)");
        let _ = tokio::signal::ctrl_c().await;
    }
    app.state.fleet.shutdown().await;
    verdict
}

/// Writes the timeline files and says whether the demo showed what it should.
fn report(
    timeline: &[Point],
    markers: &[Marker],
    scaled_up: bool,
    out: PathBuf,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&out)?;
    let json_path = out.join("timeline.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(timeline)?)?;
    let mut csv = String::from(
        "t_secs,phase,replicas,ready,stage_ready,syd_ready,requests_per_sec,p99_ms,errors\n",
    );
    for p in timeline {
        csv.push_str(&format!(
            "{:.1},{},{},{},{},{},{:.1},{:.1},{}\n",
            p.t_secs,
            p.phase,
            p.replicas,
            p.ready,
            p.stage_ready,
            p.syd_ready,
            p.requests_per_sec,
            p.p99_ms,
            p.errors
        ));
    }
    let csv_path = out.join("timeline.csv");
    std::fs::write(&csv_path, csv)?;
    let svg_path = out.join("timeline.svg");
    std::fs::write(&svg_path, svg(timeline, markers))?;
    println!(
        "timeline written to {}, {} and {}",
        json_path.display(),
        csv_path.display(),
        svg_path.display()
    );
    if !scaled_up {
        bail!("the function did not reach 4 replicas in {LOADED} under load");
    }
    if timeline
        .iter()
        .any(|p| p.stage_ready > 1 || p.syd_ready > 1)
    {
        bail!("a datacenter without load scaled up");
    }
    println!(
        "demo passed: {LOADED} went 1 → 4 replicas under load and back down when it stopped; stage and syd stayed at 1"
    );
    Ok(())
}

/// The demo serves without credentials (and `--keep` keeps it up): a page of another site
/// whose name it points at 127.0.0.1 (DNS rebinding) would be same-origin with it, so only
/// requests that name the server by a loopback name are served.
async fn loopback_names_only(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    if matches!(name, "127.0.0.1" | "localhost" | "[::1]") {
        next.run(req).await
    } else {
        (
            http::StatusCode::FORBIDDEN,
            format!(
                "the demo server answers only to 127.0.0.1, localhost and [::1], not {host:?}\n"
            ),
        )
            .into_response()
    }
}

/// Directories removed when dropped.
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for dir in &self.0 {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("cannot remove {}: {e}", dir.display());
                }
            }
        }
    }
}

/// Replicas and ready replicas per datacenter.
async fn status(
    http: &reqwest::Client,
    base: &str,
) -> std::collections::HashMap<String, (u64, u64)> {
    let v: Value = match http
        .get(format!("{base}/system/function/hello"))
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    DATACENTERS
        .iter()
        .map(|dc| {
            let d = &v["datacenters"][*dc];
            (
                dc.to_string(),
                (
                    d["replicas"].as_u64().unwrap_or(0),
                    d["availableReplicas"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

fn counts(s: &std::collections::HashMap<String, (u64, u64)>, dc: &str) -> (u64, u64) {
    s.get(dc).copied().unwrap_or_default()
}

async fn drive(
    http: &reqwest::Client,
    base: &str,
    opts: &DemoOptions,
) -> anyhow::Result<(Vec<Point>, Vec<Marker>, bool)> {
    let deploy = json!({"service": "hello", "image": "local/hello",
        "envProcess": "sh -c 'echo \"Hello, $(cat)!\"'",
        "labels": {"com.openfaas.scale.min": "1", "com.openfaas.scale.max": "4"}});
    let r = http
        .post(format!("{base}/system/functions"))
        .json(&deploy)
        .send()
        .await?;
    if r.status() != 202 {
        bail!(
            "deploy failed: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    println!("deployed hello in stage, lon and syd (min 1, max 4 in each)");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(http, base).await;
        if DATACENTERS.iter().all(|dc| counts(&s, dc).1 >= 1) {
            break;
        }
        if Instant::now() > deadline {
            bail!("hello did not become ready in every datacenter");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for dc in DATACENTERS {
        let answer = http
            .post(format!("{base}/function/hello"))
            .header(crate::proxy::DATACENTER, dc)
            .body("world")
            .send()
            .await?
            .text()
            .await?;
        println!("invoked in {dc}: {}", answer.trim());
    }

    // Bounded load from a few workers, with latencies kept for a per-second p99.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let workers = 4u64;
    let gap = Duration::from_micros(1_000_000 * workers / opts.rate.max(1));
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (stop, sent, errors, latencies, http) = (
            stop.clone(),
            sent.clone(),
            errors.clone(),
            latencies.clone(),
            http.clone(),
        );
        let url = format!("{base}/function/hello");
        handles.push(tokio::spawn(async move {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let request = http
                    .post(&url)
                    .header(crate::proxy::DATACENTER, LOADED)
                    .body("load");
                match request.send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                latencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(started.elapsed());
                sent.fetch_add(1, Ordering::Relaxed);
                next += gap;
                tokio::time::sleep_until(next.into()).await;
            }
        }));
    }
    println!(
        "load: about {} requests/s to {LOADED} (X-Faastastic-Datacenter: {LOADED}) for at most {:?}\n",
        opts.rate, opts.max_load
    );
    println!(
        "{:>6}  {:<6}  {:>12}  {:>9}  {:>7}  {:>7}  {:>8}  {:>6}",
        "t", "phase", "lon replicas", "lon ready", "stage", "syd", "p99", "errors"
    );

    let start = Instant::now();
    let start_wall = chrono::Utc::now();
    let s = status(http, base).await;
    let (replicas, ready) = counts(&s, LOADED);
    println!(
        "{:>5.0}s  {:<6}  {:>12}  {:>9}  {:>7}  {:>7}",
        0.0,
        "start",
        replicas,
        ready,
        counts(&s, "stage").1,
        counts(&s, "syd").1
    );
    let mut timeline = vec![Point {
        t_secs: 0.0,
        phase: "start",
        replicas,
        ready,
        stage_ready: counts(&s, "stage").1,
        syd_ready: counts(&s, "syd").1,
        requests_per_sec: 0.0,
        p99_ms: 0.0,
        errors: 0,
    }];
    // Alerts resolve only once the rule's 30 s window has emptied.
    let quiet_limit = Duration::from_secs(if opts.alerts.is_some() { 120 } else { 40 });
    let mut last_sent = 0;
    let mut reached_at: Option<Instant> = None;
    let mut phase = "load";
    let mut load_stopped_at: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now_sent = sent.load(Ordering::Relaxed);
        let mut window = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
        window.sort();
        let p99 = window
            .get(((window.len() as f64 - 1.0) * 0.99).round().max(0.0) as usize)
            .copied()
            .unwrap_or_default();
        let s = status(http, base).await;
        let (replicas, ready) = counts(&s, LOADED);
        let point = Point {
            t_secs: start.elapsed().as_secs_f64(),
            phase,
            replicas,
            ready,
            stage_ready: counts(&s, "stage").1,
            syd_ready: counts(&s, "syd").1,
            requests_per_sec: (now_sent - last_sent) as f64,
            p99_ms: p99.as_secs_f64() * 1e3,
            errors: errors.load(Ordering::Relaxed),
        };
        last_sent = now_sent;
        println!(
            "{:>5.0}s  {:<6}  {:>12}  {:>9}  {:>7}  {:>7}  {:>6.1}ms  {:>6}   {:.0} req/s",
            point.t_secs,
            point.phase,
            point.replicas,
            point.ready,
            point.stage_ready,
            point.syd_ready,
            point.p99_ms,
            point.errors,
            point.requests_per_sec
        );
        timeline.push(point);
        if phase == "load" {
            if ready >= 4 && reached_at.is_none() {
                reached_at = Some(Instant::now());
            }
            let held = reached_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(3));
            if held || start.elapsed() >= opts.max_load {
                stop.store(true, Ordering::Relaxed);
                for h in handles.drain(..) {
                    let _ = h.await;
                }
                phase = "quiet";
                load_stopped_at = Some(Instant::now());
            }
        } else if replicas <= 1 || load_stopped_at.is_some_and(|t| t.elapsed() >= quiet_limit) {
            break;
        }
    }

    let events: Vec<Value> = http
        .get(format!("{base}/system/scale-events?function=hello"))
        .send()
        .await?
        .json()
        .await
        .context("reading the scale events")?;
    println!("\ndecisions (oldest first):");
    for e in events.iter().rev() {
        println!(
            "  {}  {:<5}  {} -> {}  {:<8} {}",
            e["time"].as_str().unwrap_or("").get(11..19).unwrap_or(""),
            e["datacenter"].as_str().unwrap_or(""),
            e["from"],
            e["to"],
            e["outcome"].as_str().unwrap_or(""),
            e["reason"].as_str().unwrap_or("")
        );
    }
    let markers = events
        .iter()
        .rev()
        .filter_map(|e| {
            let at = chrono::DateTime::parse_from_rfc3339(e["time"].as_str()?).ok()?;
            Some(Marker {
                t_secs: (at.with_timezone(&chrono::Utc) - start_wall).num_milliseconds() as f64
                    / 1e3,
                label: format!(
                    "{} {} → {}",
                    e["datacenter"].as_str().unwrap_or(""),
                    e["from"],
                    e["to"]
                ),
            })
        })
        .collect();
    Ok((timeline, markers, reached_at.is_some()))
}

/// A self-contained SVG: ready replicas (left axis) and request rate (right axis) over time,
/// with a dashed line at every scale decision.
fn svg(timeline: &[Point], markers: &[Marker]) -> String {
    let (w, h, pad) = (900.0, 360.0, 50.0);
    let t_max = timeline.last().map(|p| p.t_secs).unwrap_or(1.0).max(1.0);
    let r_max = timeline
        .iter()
        .map(|p| p.replicas.max(p.ready))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        + 1.0;
    let q_max = timeline
        .iter()
        .map(|p| p.requests_per_sec)
        .fold(1.0, f64::max)
        * 1.1;
    let x = |t: f64| pad + (w - 2.0 * pad) * t / t_max;
    let y_r = |r: f64| h - pad - (h - 2.0 * pad) * r / r_max;
    let y_q = |q: f64| h - pad - (h - 2.0 * pad) * q / q_max;
    let mut replicas = String::new();
    let mut prev: Option<f64> = None;
    for p in timeline {
        if let Some(py) = prev {
            replicas.push_str(&format!("{:.1},{:.1} ", x(p.t_secs), py));
        }
        let yy = y_r(p.ready as f64);
        replicas.push_str(&format!("{:.1},{:.1} ", x(p.t_secs), yy));
        prev = Some(yy);
    }
    let rate: String = timeline
        .iter()
        .map(|p| format!("{:.1},{:.1} ", x(p.t_secs), y_q(p.requests_per_sec)))
        .collect();
    let mut out = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="24" font-size="15">faastastic demo: lon's ready replicas (blue) and requests/s to lon (orange); dashed lines are scale decisions</text>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="#333"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="#333"/>
<line x1="{r}" y1="{pad}" x2="{r}" y2="{b}" stroke="#333"/>
<text x="{r}" y="{tb}" text-anchor="end">{t_max:.0} s</text>
<text x="{pad}" y="{tb}">0 s</text>
<text x="12" y="{top}">{rm:.0} replicas</text>
<text x="{rl}" y="{top}" text-anchor="end">{q_max:.0} req/s</text>
"##,
        b = h - pad,
        r = w - pad,
        tb = h - pad + 18.0,
        top = pad - 6.0,
        rm = r_max,
        rl = w - 4.0,
    );
    for m in markers {
        if m.t_secs < 0.0 || m.t_secs > t_max {
            continue;
        }
        let mx = x(m.t_secs);
        out.push_str(&format!(
            "<line x1=\"{mx:.1}\" y1=\"{pad}\" x2=\"{mx:.1}\" y2=\"{:.1}\" stroke=\"#999\" stroke-dasharray=\"4 3\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#555\">{}</text>\n",
            h - pad,
            mx + 3.0,
            pad + 14.0,
            m.label
        ));
    }
    out.push_str(&format!(
        "<polyline fill=\"none\" stroke=\"#e8871e\" stroke-width=\"2\" points=\"{rate}\"/>\n<polyline fill=\"none\" stroke=\"#1f6fd1\" stroke-width=\"3\" points=\"{replicas}\"/>\n</svg>\n"
    ));
    out
}
