//! The web UI at `/ui/`, driven in headless Chromium through its WebDriver (Debian `chromium`
//! and `chromium-driver`): deploy from the form, invoke from the panel, watch a scale-up under
//! load with its decision on the function page, pause, scale past the bounds with the
//! confirmation, delete; values from users and functions shown as text with nothing run; a
//! cross-site state change refused; every control labelled; no sideways scrolling at phone
//! width. Screenshots go to `target/ui-screenshots/`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{free_port, poll, require_program, Load, Options, Server};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// chromedriver in a process group of its own, so that the browser it starts goes with it
/// however the test ends.
struct Driver(std::process::Child);

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the group is the driver's own.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

struct Browser {
    client: Client,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        require_program("chromium", "chromium");
        require_program("chromedriver", "chromium-driver");
        let port = free_port();
        let mut cmd = std::process::Command::new("chromedriver");
        cmd.arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = Driver(cmd.spawn().expect("start chromedriver"));
        let url = format!("http://127.0.0.1:{port}");
        assert!(
            poll(Duration::from_secs(20), || async {
                reqwest::get(format!("{url}/status")).await.is_ok()
            })
            .await,
            "chromedriver did not answer on {url}"
        );
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"goog:chromeOptions": {"args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1280,800", "--no-first-run", "--disable-extensions",
            format!("--user-data-dir={}", profile.path().display()),
        ]}});
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        // The driver is on loopback: plain HTTP, no TLS stack to build.
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a Chromium session");
        Browser {
            client,
            _driver: driver,
            _profile: profile,
        }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self
            .client
            .wait()
            .for_element(Locator::Css(css))
            .await
            .unwrap();
        e.clear().await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.client
            .wait()
            .for_element(Locator::Css(css))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// The text of the first element matching `css`, or "" while there is none.
    async fn text(&self, css: &str) -> String {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Waits until `css`'s text satisfies `check`; on failure saves a screenshot and says what
    /// the element showed.
    async fn wait_text(
        &self,
        css: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text(css).await;
            if check(&text) {
                return text;
            }
            if Instant::now() > deadline {
                let shot = self.screenshot("failure").await;
                panic!(
                    "{what}: {css} shows {text:?} after {timeout:?} (screenshot {})",
                    shot.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A screenshot of the top of the page.
    async fn top_screenshot(&self, name: &str) -> PathBuf {
        self.js("window.scrollTo(0, 0); return null").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.screenshot(name).await
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let dir = common::repo_file("target/ui-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        if let Ok(png) = self.client.screenshot().await {
            std::fs::write(&path, png).unwrap();
        }
        path
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// `http://user:password@host:port/ui/`: Chromium keeps the credentials for the page's own
/// requests, as it does after a person answers the login prompt.
fn ui_url(s: &Server) -> String {
    let password = s.password.clone().expect("auth is on");
    format!(
        "{}/ui/",
        s.base
            .replacen("http://", &format!("http://{}:{password}@", s.user), 1)
    )
}

/// The write-up's three datacenters, and a query policy on faastastic's own counters: 10
/// invocations/s per replica.
const SCALING: &str = r#"
[[datacenters]]
name = "stage"
home = true
[[datacenters]]
name = "lon"
[[datacenters]]
name = "syd"
[autoscale]
tick_interval_ms = 250
[[autoscale.queries]]
name = "ui-rate"
source = "internal"
target = 10
interval_ms = 1000
"#;

#[tokio::test]
async fn a_person_deploys_invokes_watches_a_scale_up_pauses_and_deletes_from_the_ui() {
    let s = Server::with(Options {
        auth: true,
        config: Some(SCALING),
        ..Default::default()
    });
    let b = Browser::start().await;
    let ui = ui_url(&s);

    // The page and its assets come with a policy that allows no inline script.
    let page = s.system(reqwest::Method::GET, "/ui/").send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let anonymous = reqwest::get(s.url("/ui/")).await.unwrap();
    assert_eq!(
        anonymous.status(),
        401,
        "the UI needs the API's credentials"
    );

    // Deploy form: the server's own validation messages appear next to the fields they name.
    b.goto(&format!("{ui}#/deploy")).await;
    b.wait_text(
        "#deploy-datacenters",
        "datacenters offered",
        Duration::from_secs(10),
        |t| t.contains("stage (home)") && t.contains("syd"),
    )
    .await;
    b.type_into("#deploy-name", "Bad_Name").await;
    b.click("#deploy-form button[type=submit]").await;
    let name_error = b
        .wait_text(
            "#deploy-name-error",
            "the name's error",
            Duration::from_secs(10),
            |t| !t.is_empty(),
        )
        .await;
    assert!(
        name_error.contains("lower case alphanumeric"),
        "{name_error}"
    );
    let command_error = b.text("#deploy-command-error").await;
    assert!(command_error.contains("envProcess"), "{command_error}");
    assert_eq!(
        s.status("bad-name").await.0,
        404,
        "nothing was deployed from the refused form"
    );

    b.type_into("#deploy-name", "hello-ui").await;
    b.type_into("#deploy-command", "cat").await;
    b.client
        .find(Locator::Css("#deploy-scale-label"))
        .await
        .unwrap()
        .select_by_value("com.openfaas.scale.max=5")
        .await
        .unwrap();
    let labels: String = b
        .client
        .find(Locator::Css("#deploy-labels"))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap()
        .unwrap_or_default();
    assert_eq!(
        labels, "com.openfaas.scale.max=5",
        "the scale label was offered by name"
    );
    b.type_into("#deploy-labels", "com.openfaas.scale.max=4")
        .await;
    b.type_into("#deploy-env", "GREETING=hi").await;
    b.click("#deploy-form button[type=submit]").await;
    b.wait_text(
        "#replicas tbody",
        "one ready replica after deploying",
        Duration::from_secs(20),
        |t| t.contains("stage 1 1") && t.contains("syd 1 1"),
    )
    .await;
    let (code, status) = s.status("hello-ui").await;
    assert_eq!(code, 200);
    assert_eq!(status["envProcess"], "cat");
    assert_eq!(status["labels"]["com.openfaas.scale.max"], "4");
    assert_eq!(status["envVars"]["GREETING"], "hi");

    // Invoke panel.
    b.type_into("#invoke-body", "hello from the browser").await;
    b.click("#invoke-form button[type=submit]").await;
    b.wait_text(
        "#invoke-status",
        "the invocation's status",
        Duration::from_secs(10),
        |t| t.starts_with("200"),
    )
    .await;
    assert_eq!(b.text("#invoke-answer").await, "hello from the browser");

    // Load: the autoscaler scales up, the page shows the replicas and the decision.
    let load = Load::start(&s, "hello-ui", 60, Duration::from_secs(60));
    b.wait_text(
        "#replicas tbody",
        "4 replicas under load",
        Duration::from_secs(30),
        |t| t.contains("stage 4"),
    )
    .await;
    b.wait_text(
        "#decisions",
        "the scale-up decision",
        Duration::from_secs(10),
        |t| t.contains("→ 4") && t.contains("query:ui-rate"),
    )
    .await;
    assert!(
        poll(Duration::from_secs(10), || async {
            b.js("return document.querySelectorAll('#chart svg g.marker.up').length")
                .await
                .as_u64()
                >= Some(1)
        })
        .await,
        "the decision is marked on the chart"
    );
    // A few more seconds of load, so that the screenshot shows the rate and the step.
    tokio::time::sleep(Duration::from_secs(8)).await;
    b.top_screenshot("function-under-load").await;
    b.goto(&format!("{ui}#/")).await;
    b.wait_text(
        "#functions tbody",
        "the functions page",
        Duration::from_secs(10),
        |t| t.contains("hello-ui") && t.contains("4/4") && t.contains("1/1"),
    )
    .await;
    // The rate needs two polls of the list.
    b.wait_text(
        "#functions tbody tr td.rate",
        "the invocation rate under 60/s of load",
        Duration::from_secs(10),
        |t| t.parse::<f64>().is_ok_and(|r| r > 20.0),
    )
    .await;
    b.top_screenshot("functions").await;
    assert!(load.stop().await > 0, "the load ran");

    // Pause from the function page.
    b.goto(&format!("{ui}#/function/hello-ui/openfaas-fn"))
        .await;
    b.wait_text(
        "#pause-state",
        "the pause state",
        Duration::from_secs(10),
        |t| t.contains("on"),
    )
    .await;
    // Opened after the scale-up, the chart still shows it: the replica counts before the page
    // opened are stepped from the decisions.
    assert!(
        poll(Duration::from_secs(10), || async {
            b.js("const l = document.querySelector('#chart polyline.seeded[data-dc=stage]'); return l ? l.getAttribute('points').split(' ').length : 0").await.as_u64() >= Some(4)
        })
        .await,
        "stage's scale-up drawn from its decisions"
    );
    b.click("#pause").await;
    b.wait_text("#pause-state", "paused", Duration::from_secs(10), |t| {
        t.contains("paused")
    })
    .await;
    let pauses: Value = s.get_json("/system/autoscaling").await;
    assert_eq!(
        pauses["paused"][0]["scope"], "hello-ui.openfaas-fn",
        "{pauses}"
    );

    // Scaling one datacenter past max asks for a confirmation first.
    b.client
        .find(Locator::Css("#scale-dc"))
        .await
        .unwrap()
        .select_by_value("stage")
        .await
        .unwrap();
    b.type_into("#scale-replicas", "6").await;
    b.click("#scale-form button[type=submit]").await;
    b.wait_text(
        "#scale-confirm",
        "the override confirmation",
        Duration::from_secs(10),
        |t| t.contains("anyway"),
    )
    .await;
    let stage =
        || async { s.status("hello-ui").await.1["datacenters"]["stage"]["replicas"].clone() };
    assert_eq!(stage().await, 4, "nothing changed before the confirmation");
    b.click("#scale-override").await;
    assert!(
        poll(Duration::from_secs(10), || async { stage().await == 6 }).await,
        "the confirmed override scaled stage to 6"
    );

    // Delete, with its confirmation.
    b.click("#delete").await;
    b.click("#delete-confirm").await;
    b.wait_text(
        "#delete-message",
        "the deletion",
        Duration::from_secs(10),
        |t| t.contains("deleted"),
    )
    .await;
    assert_eq!(s.status("hello-ui").await.0, 404);

    // The datacenters chosen in the form are where the function runs.
    b.goto(&format!("{ui}#/deploy")).await;
    b.wait_text(
        "#deploy-datacenters",
        "datacenters offered",
        Duration::from_secs(10),
        |t| t.contains("syd"),
    )
    .await;
    b.type_into("#deploy-name", "only-lon").await;
    b.type_into("#deploy-command", "cat").await;
    b.click("#dc-stage").await;
    b.click("#dc-syd").await;
    b.click("#deploy-form button[type=submit]").await;
    b.wait_text(
        "#replicas tbody",
        "the function in lon",
        Duration::from_secs(20),
        |t| t.contains("lon 1 1"),
    )
    .await;
    let placed = s.status("only-lon").await.1["datacenters"].clone();
    let placed: Vec<&String> = placed.as_object().unwrap().keys().collect();
    assert_eq!(placed, ["lon"]);

    // Every control has a label, and a phone-width screen does not scroll sideways.
    for page in ["#/", "#/deploy", "#/overview"] {
        b.goto(&format!("{ui}{page}")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let unlabelled = b
            .js("return [...document.querySelectorAll('input, select, textarea, button')].filter(e => !e.labels?.length && !e.getAttribute('aria-label') && !e.textContent.trim()).map(e => e.outerHTML)")
            .await;
        assert_eq!(unlabelled, json!([]), "{page}");
    }
    b.client.set_window_size(390, 844).await.unwrap();
    b.goto(&format!("{ui}#/overview")).await;
    b.wait_text(
        "#datacenters",
        "the overview",
        Duration::from_secs(10),
        |t| t.contains("syd"),
    )
    .await;
    let wide = b
        .js("return document.documentElement.scrollWidth - window.innerWidth")
        .await;
    assert!(
        wide.as_i64() <= Some(0),
        "{wide} px of sideways scrolling at phone width"
    );
    b.close().await;
}

/// A page on another site (`localhost` against the server's `127.0.0.1`) that tries, as soon
/// as it loads, to pause every function with a no-cors fetch and to scale `victim` with a
/// self-submitting form whose text/plain body reads as JSON.
async fn hostile_site(target: &str) -> (String, tokio::task::JoinHandle<()>) {
    let page = format!(
        r#"<!doctype html><html><body>
<form id="f" method="POST" action="{target}/system/scale-function/victim" enctype="text/plain">
<input name='{{"serviceName":"victim","replicas":3,"pad":"' value='"}}'>
</form>
<script>
fetch("{target}/system/autoscaling/pause", {{method: "POST", mode: "no-cors", credentials: "include", body: "{{}}"}})
  .finally(() => document.getElementById("f").submit());
</script></body></html>"#
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.clone();
            async move { axum::response::Html(page) }
        }),
    );
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://localhost:{port}/"), server)
}

#[tokio::test]
async fn values_from_users_and_functions_are_text_and_cross_site_changes_are_refused() {
    // Without auth nothing but the cross-site check stands between another site's page and
    // the API, so this is where it must hold.
    let s = Server::start();
    let b = Browser::start().await;
    let xss = json!({
        "service": "xss",
        "image": "local/<b>bold</b>",
        "envProcess": "sh -c 'echo \"<img src=y onerror=window.__xss=3>\" >&2; cat'",
        "labels": {"note": "<img src=x onerror=\"window.__xss=1\">"},
        "annotations": {"about": "<script>window.__xss=2</script>"},
        "envVars": {"HTML": "</dd><img src=e onerror=window.__xss=5>"},
    });
    assert_eq!(s.deploy(xss).await.status(), 202);
    assert_eq!(
        s.deploy(common::echo_function("victim")).await.status(),
        202
    );
    s.wait_available("xss", 1).await;
    s.wait_available("victim", 1).await;
    assert_eq!(s.invoke("xss", "warm").await.0, 200);

    let ui = format!("{}/ui/", s.base);
    b.goto(&format!("{ui}#/")).await;
    b.type_into("#filter", "onerror").await;
    b.wait_text(
        "#functions tbody",
        "the filter matching a label",
        Duration::from_secs(10),
        |t| t.contains("xss") && !t.contains("victim"),
    )
    .await;
    b.goto(&format!("{ui}#/function/xss/openfaas-fn")).await;
    b.wait_text(
        "#logs",
        "the function's log line",
        Duration::from_secs(15),
        |t| t.contains("<img src=y"),
    )
    .await;
    b.type_into("#invoke-body", "<img src=z onerror=window.__xss=4>")
        .await;
    b.click("#invoke-form button[type=submit]").await;
    b.wait_text(
        "#invoke-answer",
        "the answer",
        Duration::from_secs(10),
        |t| t.contains("<img src=z"),
    )
    .await;
    let details = b.text(".details").await;
    for shown in [
        "<img src=x onerror=",
        "<script>window.__xss=2</script>",
        "</dd><img src=e",
    ] {
        assert!(
            details.contains(shown),
            "{shown:?} shown as text in {details:?}"
        );
    }
    assert!(b.text(".facts").await.contains("local/<b>bold</b>"));
    let injected = b
        .js("return {ran: window.__xss ?? null, elements: document.querySelectorAll('main img, main script, main b').length}")
        .await;
    assert_eq!(
        injected,
        json!({"ran": null, "elements": 0}),
        "markup from values became elements or ran"
    );

    // Another site's page: both of its requests reach the server and are refused.
    let (evil, _site) = hostile_site(&s.base).await;
    b.goto(&evil).await;
    let refusal = b
        .wait_text(
            "body",
            "the form post's answer",
            Duration::from_secs(10),
            |t| t.contains("cross-site request refused"),
        )
        .await;
    assert!(refusal.contains("Sec-Fetch-Site: cross-site"), "{refusal}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        s.status("victim").await.1["replicas"],
        1,
        "the cross-site form scaled the function"
    );
    let pauses: Value = s.get_json("/system/autoscaling").await;
    assert_eq!(
        pauses["paused"],
        json!([]),
        "the cross-site fetch paused autoscaling"
    );
    // The same calls from the UI's own origin, and from a client that is not a browser, work.
    b.goto(&ui).await;
    let own = b
        .js("return fetch('/system/scale-function/victim', {method: 'POST', body: JSON.stringify({serviceName: 'victim', replicas: 2})}).then(r => r.status)")
        .await;
    assert_eq!(own, json!(202), "the UI's own origin may change state");
    assert_eq!(
        s.scale("victim", 1).await,
        202,
        "a client that is not a browser may"
    );

    // A scheduled function's page shows its schedule and what became of its due times.
    let cron = json!({"service": "every-second", "image": "local/cron", "envProcess": "cat",
        "annotations": {"topic": "cron-function", "schedule": "* * * * * *"}});
    assert_eq!(s.deploy(cron).await.status(), 202);
    b.goto(&format!("{ui}#/function/every-second/openfaas-fn"))
        .await;
    b.wait_text("#schedule", "the schedule", Duration::from_secs(10), |t| {
        t.contains("* * * * * *")
    })
    .await;
    b.wait_text("#runs", "a run", Duration::from_secs(15), |t| {
        t.contains("ok 200")
    })
    .await;
    b.close().await;
}

#[tokio::test]
async fn the_functions_page_pages_and_filters_without_rendering_every_row() {
    let s = Server::start();
    let b = Browser::start().await;
    // Dormant functions: no replica runs, so many cost little.
    for i in 0..120 {
        let mut f = common::echo_function(&format!("fn-{i:03}"));
        f["labels"] = json!({"com.faastastic.scale.initial": "0", "team": if i % 2 == 0 { "even" } else { "odd" }});
        assert_eq!(s.deploy(f).await.status(), 202);
    }
    b.goto(&format!("{}/ui/#/", s.base)).await;
    b.wait_text("#summary", "the first page", Duration::from_secs(10), |t| {
        t == "120 functions, showing 1–50"
    })
    .await;
    let rows = || async {
        b.js("return [...document.querySelectorAll('#functions tbody tr')].map(r => r.dataset.function)")
            .await
    };
    let first = rows().await;
    assert_eq!(
        first.as_array().unwrap().len(),
        50,
        "one page of rows, not every function"
    );
    assert_eq!(first[0], "fn-000");
    assert!(b.text("#functions tbody").await.contains("Scaled to zero"));
    b.click("#next-page").await;
    b.click("#next-page").await;
    b.wait_text("#summary", "the last page", Duration::from_secs(5), |t| {
        t.ends_with("showing 101–120")
    })
    .await;
    assert!(
        b.client
            .find(Locator::Css("#next-page"))
            .await
            .unwrap()
            .prop("disabled")
            .await
            .unwrap()
            == Some("true".into())
    );
    // The filter reads names and labels.
    b.type_into("#filter", "fn-01").await;
    b.wait_text(
        "#summary",
        "the filtered list",
        Duration::from_secs(5),
        |t| t == "120 functions, 10 match, showing 1–10",
    )
    .await;
    b.type_into("#filter", "team=odd").await;
    b.wait_text(
        "#summary",
        "the filtered list",
        Duration::from_secs(5),
        |t| t == "120 functions, 60 match, showing 1–50",
    )
    .await;
    assert_eq!(rows().await[0], "fn-001");
    b.close().await;
}
