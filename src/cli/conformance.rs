//! `faastastic conformance`: replays the request sequences of faas-cli, the Terraform provider
//! and the OpenFaaS gateway against any gateway or provider, and checks every answer against
//! what those clients accept. Prints one row per check; the run fails when a required check
//! fails. Recommended-but-optional behaviour (async invocations, `X-Call-Id`) is reported as a
//! warning, not a failure.
//!
//! It deploys two functions (an echo, `cat`, and `env`, which shows the function's
//! environment) and one secret under names unique to the run, and removes them at the end,
//! whatever the outcome. The image must run a watchdog that executes `fprocess` (the OpenFaaS
//! classic watchdog images do; faastastic's local platform runs `envProcess` itself).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};

use crate::error_chain;

/// What to test and how to reach it.
#[derive(Debug, Clone)]
pub struct Options {
    /// Base URL of the gateway or provider, e.g. `http://127.0.0.1:8080`.
    pub gateway: String,
    pub user: String,
    /// Without a password the authentication checks are skipped (reported as warnings).
    pub password: Option<String>,
    pub namespace: String,
    pub image: String,
    /// How long a deployed or scaled function may take to become ready.
    pub ready_timeout: Duration,
    /// A PEM CA to trust for an `https://` gateway (a private CA), instead of the public roots.
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// A client breaks without it.
    Must,
    /// Recommended; a miss is a warning.
    Should,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// The section of the request sequences (or the status-code matrix) it comes from.
    pub section: &'static str,
    pub name: String,
    pub expected: String,
    pub got: String,
    pub level: Level,
    pub pass: bool,
}

impl Check {
    pub fn result(&self) -> &'static str {
        match (self.pass, self.level) {
            (true, _) => "PASS",
            (false, Level::Must) => "FAIL",
            (false, Level::Should) => "WARN",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub gateway: String,
    pub checks: Vec<Check>,
}

impl Report {
    /// True when every required check passed.
    pub fn passed(&self) -> bool {
        self.checks
            .iter()
            .all(|c| c.pass || c.level == Level::Should)
    }

    /// A plain-text table, one row per check, and a summary line.
    pub fn table(&self) -> String {
        let widths = [
            self.checks
                .iter()
                .map(|c| c.section.len())
                .max()
                .unwrap_or(0)
                .max("section".len()),
            self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0),
            self.checks
                .iter()
                .map(|c| c.expected.len())
                .max()
                .unwrap_or(0),
        ];
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  result  got",
            "section",
            "check",
            "expected",
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
        for c in &self.checks {
            let _ = writeln!(
                out,
                "{:<w0$}  {:<w1$}  {:<w2$}  {:<6}  {}",
                c.section,
                c.name,
                c.expected,
                c.result(),
                c.got,
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2]
            );
        }
        let count = |r: &str| self.checks.iter().filter(|c| c.result() == r).count();
        let _ = writeln!(
            out,
            "{} checks against {}: {} passed, {} failed, {} warnings",
            self.checks.len(),
            self.gateway,
            count("PASS"),
            count("FAIL"),
            count("WARN")
        );
        out
    }
}

/// An answer: status, headers and body, or why there was none.
struct Answer {
    /// Set by [`Kit::expect`]: the status was one of those accepted.
    passed: bool,
    status: Option<StatusCode>,
    headers: reqwest::header::HeaderMap,
    body: String,
    error: Option<String>,
}

impl Answer {
    fn code(&self) -> u16 {
        self.status.map(|s| s.as_u16()).unwrap_or(0)
    }

    fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }

    /// What the table shows: the status and the start of the body, or the transport error.
    fn summary(&self) -> String {
        match (&self.error, self.status) {
            (Some(e), _) => format!("error: {e}"),
            (None, Some(s)) => {
                let body: String = self
                    .body
                    .trim()
                    .chars()
                    .take(60)
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                if body.is_empty() {
                    s.as_u16().to_string()
                } else {
                    format!("{} {body}", s.as_u16())
                }
            }
            (None, None) => "no answer".into(),
        }
    }
}

#[derive(Clone, Copy)]
enum Auth {
    None,
    Wrong,
    Right,
}

enum Body<'a> {
    Empty,
    Json(Value),
    Raw(&'a str, &'a str),
}

struct Kit {
    http: reqwest::Client,
    opts: Options,
    checks: Vec<Check>,
    echo: String,
    env: String,
    secret: String,
}

/// Runs every check against `opts.gateway` and returns the report.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let http = reqwest::Client::builder()
        .user_agent(concat!(
            "faas-cli/0.17.0 (faastastic-conformance/",
            env!("CARGO_PKG_VERSION"),
            ")"
        ))
        .timeout(Duration::from_secs(30));
    let http = match &opts.ca_file {
        Some(ca) => {
            let tls = crate::tls::ClientTls {
                ca_file: Some(ca.clone()),
                ..Default::default()
            };
            http.use_preconfigured_tls(tls.config()?)
        }
        None => http,
    }
    .build()?;
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let mut kit = Kit {
        http,
        echo: format!("conformance-echo-{run_id}"),
        env: format!("conformance-env-{run_id}"),
        secret: format!("conformance-secret-{run_id}"),
        opts: Options {
            gateway: opts.gateway.trim_end_matches('/').to_string(),
            ..opts
        },
        checks: Vec::new(),
    };
    kit.run_all().await;
    kit.clean_up().await;
    Ok(Report {
        gateway: kit.opts.gateway.clone(),
        checks: kit.checks,
    })
}

impl Kit {
    async fn send(&self, method: Method, path: &str, auth: Auth, body: Body<'_>) -> Answer {
        let url = format!("{}{path}", self.opts.gateway);
        let mut req = self.http.request(method, url);
        match (auth, &self.opts.password) {
            (Auth::Right, Some(p)) => req = req.basic_auth(&self.opts.user, Some(p)),
            (Auth::Wrong, _) => {
                req = req.basic_auth(&self.opts.user, Some("not-the-password-conformance"))
            }
            _ => {}
        }
        req = match body {
            Body::Empty => req,
            Body::Json(v) => req.json(&v),
            Body::Raw(content_type, text) => req
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(text.to_string()),
        };
        match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let headers = resp.headers().clone();
                match resp.text().await {
                    Ok(body) => Answer {
                        passed: false,
                        status: Some(status),
                        headers,
                        body,
                        error: None,
                    },
                    Err(e) => Answer {
                        passed: false,
                        status: Some(status),
                        headers,
                        body: String::new(),
                        error: Some(format!("reading the body: {e}")),
                    },
                }
            }
            Err(e) => Answer {
                passed: false,
                status: None,
                headers: Default::default(),
                body: String::new(),
                error: Some(error_chain(&e)),
            },
        }
    }

    /// One call with credentials, its status checked against `accept` and recorded.
    async fn expect(
        &mut self,
        section: &'static str,
        name: &str,
        accept: &[u16],
        method: Method,
        path: &str,
        body: Body<'_>,
    ) -> Answer {
        self.expect_with(section, name, accept, method, path, Auth::Right, body)
            .await
    }

    /// [`Self::expect`] with the given credentials.
    #[allow(clippy::too_many_arguments)]
    async fn expect_with(
        &mut self,
        section: &'static str,
        name: &str,
        accept: &[u16],
        method: Method,
        path: &str,
        auth: Auth,
        body: Body<'_>,
    ) -> Answer {
        let mut a = self.send(method, path, auth, body).await;
        a.passed = self.status(section, name, &a, accept);
        a
    }

    async fn system(&self, method: Method, path: &str, body: Body<'_>) -> Answer {
        self.send(method, path, Auth::Right, body).await
    }

    fn record(
        &mut self,
        section: &'static str,
        name: &str,
        expected: String,
        got: String,
        pass: bool,
    ) {
        self.record_at(Level::Must, section, name, expected, got, pass);
    }

    fn record_at(
        &mut self,
        level: Level,
        section: &'static str,
        name: &str,
        expected: String,
        got: String,
        pass: bool,
    ) {
        self.checks.push(Check {
            section,
            name: name.to_string(),
            expected,
            got,
            level,
            pass,
        });
    }

    /// Checks the status against the codes clients accept (`accept[0]` is the recommended one).
    fn status(
        &mut self,
        section: &'static str,
        name: &str,
        answer: &Answer,
        accept: &[u16],
    ) -> bool {
        self.status_at(Level::Must, section, name, answer, accept)
    }

    fn status_at(
        &mut self,
        level: Level,
        section: &'static str,
        name: &str,
        answer: &Answer,
        accept: &[u16],
    ) -> bool {
        let pass = answer.error.is_none() && accept.contains(&answer.code());
        let expected = accept
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join("/");
        self.record_at(level, section, name, expected, answer.summary(), pass);
        pass
    }

    fn qs(&self) -> String {
        format!("namespace={}", self.opts.namespace)
    }

    fn deployment(&self, name: &str, process: &str, env: Value) -> Value {
        json!({
            "service": name,
            "image": self.opts.image,
            "namespace": self.opts.namespace,
            "envProcess": process,
            "envVars": env,
            "labels": {"com.openfaas.scale.min": "1"},
            "annotations": {}
        })
    }

    async fn run_all(&mut self) {
        self.health_auth_info().await;
        let echo = self.echo.clone();
        if !self.deploy_flow(&echo).await {
            return;
        }
        if !self.wait_ready(&echo, 1).await {
            return;
        }
        self.read_flows(&echo).await;
        self.invoke_flows(&echo).await;
        self.scale_flows(&echo).await;
        self.update_flows(&echo).await;
        self.redeploy_routing().await;
        self.logs(&echo).await;
        self.secrets().await;
        self.remove_flow(&echo).await;
    }

    async fn health_auth_info(&mut self) {
        self.expect_with(
            "7.8 ready",
            "GET /healthz, no credentials",
            &[200],
            Method::GET,
            "/healthz",
            Auth::None,
            Body::Empty,
        )
        .await;

        if self.opts.password.is_some() {
            let a = self
                .send(Method::GET, "/system/functions", Auth::None, Body::Empty)
                .await;
            self.status(
                "1.4 auth",
                "GET /system/functions, no credentials",
                &a,
                &[401],
            );
            let a = self
                .send(Method::GET, "/system/functions", Auth::Wrong, Body::Empty)
                .await;
            self.status(
                "1.4 auth",
                "GET /system/functions, wrong password",
                &a,
                &[401],
            );
            let a = self
                .send(
                    Method::POST,
                    "/system/scale-function/x",
                    Auth::Wrong,
                    Body::Empty,
                )
                .await;
            self.status(
                "1.4 auth",
                "POST /system/scale-function, wrong password",
                &a,
                &[401],
            );
        } else {
            self.record_at(
                Level::Should,
                "1.4 auth",
                "authentication (no password given)",
                "401".into(),
                "skipped".into(),
                false,
            );
        }
        let a = self
            .expect(
                "7.8 login",
                "GET /system/functions (faas-cli login)",
                &[200],
                Method::GET,
                "/system/functions",
                Body::Empty,
            )
            .await;
        if a.passed {
            let ok = a.json().is_some_and(|v| v.is_array());
            self.record(
                "7.2 list",
                "list is a JSON array",
                "array".into(),
                a.summary(),
                ok,
            );
        }

        let a = self.system(Method::GET, "/system/info", Body::Empty).await;
        if self.status("7.7 version", "GET /system/info", &a, &[200]) {
            let v = a.json().unwrap_or(Value::Null);
            let missing: Vec<&str> = [
                ("provider.provider", &v["provider"]["provider"]),
                ("provider.orchestration", &v["provider"]["orchestration"]),
                (
                    "provider.version.release",
                    &v["provider"]["version"]["release"],
                ),
                ("provider.version.sha", &v["provider"]["version"]["sha"]),
                ("version.release", &v["version"]["release"]),
            ]
            .into_iter()
            .filter(|(_, v)| !v.is_string())
            .map(|(k, _)| k)
            .collect();
            let got = if missing.is_empty() {
                "all strings".into()
            } else {
                format!("missing or null: {}", missing.join(", "))
            };
            self.record(
                "7.7 version",
                "info fields faas-cli prints are strings",
                "strings".into(),
                got,
                missing.is_empty(),
            );
        }
        let a = self
            .expect(
                "7.8 namespaces",
                "GET /system/namespaces",
                &[200],
                Method::GET,
                "/system/namespaces",
                Body::Empty,
            )
            .await;
        if a.passed {
            let ok = a
                .json()
                .and_then(|v| v.as_array().cloned())
                .is_some_and(|names| names.iter().all(Value::is_string));
            self.record(
                "7.8 namespaces",
                "namespaces is an array of names",
                "array of strings".into(),
                a.summary(),
                ok,
            );
        }
        let a = self.system(Method::GET, "/system/alert", Body::Empty).await;
        self.status("1.3.14 alert", "GET /system/alert (POST only)", &a, &[405]);
    }

    /// §7.1: PUT, and POST only after a 404; then the matrix's deploy rows.
    async fn deploy_flow(&mut self, name: &str) -> bool {
        let body = self.deployment(name, "cat", json!({}));
        self.expect(
            "7.1 deploy",
            "PUT of a new function (update not found)",
            &[404],
            Method::PUT,
            "/system/functions",
            Body::Json(body.clone()),
        )
        .await;
        let a = self
            .system(Method::POST, "/system/functions", Body::Json(body.clone()))
            .await;
        if !self.status("7.1 deploy", "POST after the 404", &a, &[202, 200]) {
            return false;
        }
        self.expect(
            "1.4 matrix",
            "POST of an existing name",
            &[409, 400],
            Method::POST,
            "/system/functions",
            Body::Json(body),
        )
        .await;
        self.expect(
            "1.4 matrix",
            "POST of malformed JSON",
            &[400],
            Method::POST,
            "/system/functions",
            Body::Raw("application/json", r#"{"service": "#),
        )
        .await;
        self.expect(
            "1.4 matrix",
            "POST without an image",
            &[400],
            Method::POST,
            "/system/functions",
            Body::Json(json!({"service": format!("{name}-noimage")})),
        )
        .await;
        true
    }

    /// §7.8 `faas-cli ready NAME`: polls status until `availableReplicas >= want`.
    async fn wait_ready(&mut self, name: &str, want: u64) -> bool {
        let path = format!("/system/function/{name}?{}&usage=1", self.qs());
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < self.opts.ready_timeout {
            let a = self.system(Method::GET, &path, Body::Empty).await;
            let v = a.json().unwrap_or(Value::Null);
            if a.code() == 200 && v["availableReplicas"].as_u64().is_some_and(|n| n >= want) {
                self.record(
                    "7.8 ready",
                    &format!("{name} has {want} available replica(s)"),
                    format!("within {}s", self.opts.ready_timeout.as_secs()),
                    format!("after {:.1}s", started.elapsed().as_secs_f64()),
                    true,
                );
                return true;
            }
            last = a.summary();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.record(
            "7.8 ready",
            &format!("{name} has {want} available replica(s)"),
            format!("within {}s", self.opts.ready_timeout.as_secs()),
            format!("timed out; last: {last}"),
            false,
        );
        false
    }

    /// §7.2 list and §7.3 describe.
    async fn read_flows(&mut self, name: &str) {
        let a = self
            .expect(
                "7.2 list",
                "GET /system/functions?namespace=",
                &[200],
                Method::GET,
                &format!("/system/functions?{}", self.qs()),
                Body::Empty,
            )
            .await;
        if a.passed {
            let entry = a
                .json()
                .and_then(|v| v.as_array()?.iter().find(|f| f["name"] == name).cloned());
            let got = match &entry {
                None => "function not in the list".to_string(),
                Some(f) => status_fields_missing(f),
            };
            self.record(
                "7.2 list",
                "entry has name, image and numeric counts",
                "present".into(),
                got.clone(),
                got == "present",
            );
        }
        let a = self
            .expect(
                "7.3 describe",
                "GET /system/function/NAME?usage=1",
                &[200],
                Method::GET,
                &format!("/system/function/{name}?{}&usage=1", self.qs()),
                Body::Empty,
            )
            .await;
        if a.passed {
            let got = status_fields_missing(&a.json().unwrap_or(Value::Null));
            self.record(
                "7.3 describe",
                "status has name, image and numeric counts",
                "present".into(),
                got.clone(),
                got == "present",
            );
        }
        // Terraform reads without a namespace: the default namespace applies.
        if self.opts.namespace == "openfaas-fn" {
            let a = self
                .system(
                    Method::GET,
                    &format!("/system/function/{name}"),
                    Body::Empty,
                )
                .await;
            self.status(
                "7.9 terraform",
                "GET /system/function/NAME (no namespace)",
                &a,
                &[200],
            );
        }
        self.expect(
            "1.4 matrix",
            "status of a missing function",
            &[404],
            Method::GET,
            &format!("/system/function/{name}-missing?{}", self.qs()),
            Body::Empty,
        )
        .await;
    }

    /// §7.5 and §7.6.
    async fn invoke_flows(&mut self, name: &str) {
        let ns = self.opts.namespace.clone();
        let a = self
            .expect_with(
                "7.5 invoke",
                "POST /function/NAME.NS, no credentials",
                &[200],
                Method::POST,
                &format!("/function/{name}.{ns}"),
                Auth::None,
                Body::Raw("text/plain", "hi\n"),
            )
            .await;
        if a.passed {
            self.record(
                "7.5 invoke",
                "the echo answers with the request body",
                "hi".into(),
                a.summary(),
                a.body == "hi\n",
            );
            let has_call_id = a.headers.contains_key("x-call-id");
            self.record_at(
                Level::Should,
                "1.3.11 invoke",
                "response carries X-Call-Id",
                "present".into(),
                if has_call_id { "present" } else { "absent" }.into(),
                has_call_id,
            );
        }
        if ns == "openfaas-fn" {
            let a = self
                .send(
                    Method::POST,
                    &format!("/function/{name}"),
                    Auth::None,
                    Body::Raw("text/plain", "hi\n"),
                )
                .await;
            self.status(
                "7.5 invoke",
                "POST /function/NAME (older faas-cli)",
                &a,
                &[200],
            );
        }
        self.expect_with(
            "1.3.11 invoke",
            "GET with a path and a query",
            &[200],
            Method::GET,
            &format!("/function/{name}.{ns}/a/b?x=1"),
            Auth::None,
            Body::Empty,
        )
        .await;
        self.expect_with(
            "1.3.11 invoke",
            "invoke of a missing function",
            &[404, 503],
            Method::POST,
            &format!("/function/{name}-missing.{ns}"),
            Auth::None,
            Body::Raw("text/plain", "hi\n"),
        )
        .await;
        let a = self
            .send(
                Method::POST,
                &format!("/async-function/{name}.{ns}"),
                Auth::None,
                Body::Raw("text/plain", "hi\n"),
            )
            .await;
        self.status_at(
            Level::Should,
            "7.6 async",
            "POST /async-function/NAME.NS",
            &a,
            &[202],
        );
    }

    /// go-sdk ScaleFunction and the gateway's scale call (§7.8, §7.11).
    async fn scale_flows(&mut self, name: &str) {
        let ns = self.opts.namespace.clone();
        let a = self
            .expect(
                "7.8 scale",
                "POST /system/scale-function/NAME to 2",
                &[202, 200],
                Method::POST,
                &format!("/system/scale-function/{name}?namespace={ns}"),
                Body::Json(json!({"serviceName": name, "replicas": 2, "namespace": ns})),
            )
            .await;
        if a.passed {
            self.wait_ready(name, 2).await;
        }
        self.expect(
            "1.4 matrix",
            "scale of a missing function",
            &[404],
            Method::POST,
            &format!("/system/scale-function/{name}-missing?namespace={ns}"),
            Body::Json(json!({"serviceName": format!("{name}-missing"), "replicas": 1})),
        )
        .await;
    }

    /// §7.9: Terraform's update body (every field present, nulls, unknown fields).
    async fn update_flows(&mut self, name: &str) {
        let body = json!({
            "service": name, "image": self.opts.image, "namespace": self.opts.namespace,
            "network": "", "envProcess": "cat", "envVars": null, "constraints": null,
            "secrets": null, "labels": null, "annotations": null, "limits": null,
            "requests": null, "readOnlyRootFilesystem": false, "someFutureField": {"a": 1}
        });
        let a = self
            .expect(
                "7.9 terraform",
                "PUT with every field, nulls and an unknown one",
                &[202, 200],
                Method::PUT,
                "/system/functions",
                Body::Json(body),
            )
            .await;
        if a.passed {
            self.wait_ready(name, 1).await;
        }
    }

    /// A redeploy under the same name must never route to the old replicas: the
    /// environment the function shows moves from generation 1 to 2 and stays there.
    async fn redeploy_routing(&mut self) {
        let name = self.env.clone();
        let ns = self.opts.namespace.clone();
        let path = format!("/function/{name}.{ns}");
        let generation = |n: u32| json!({"CONFORMANCE_GENERATION": n.to_string()});
        let body = self.deployment(&name, "env", generation(1));
        let a = self
            .system(Method::POST, "/system/functions", Body::Json(body))
            .await;
        if !self.status("7.1 redeploy", "deploy generation 1", &a, &[202, 200])
            || !self.wait_ready(&name, 1).await
        {
            return;
        }
        let a = self
            .send(Method::POST, &path, Auth::None, Body::Empty)
            .await;
        self.record(
            "7.1 redeploy",
            "generation 1 answers",
            "CONFORMANCE_GENERATION=1".into(),
            a.summary(),
            a.body.contains("CONFORMANCE_GENERATION=1"),
        );
        let body = self.deployment(&name, "env", generation(2));
        let a = self
            .system(Method::PUT, "/system/functions", Body::Json(body))
            .await;
        if !self.status("7.1 redeploy", "update to generation 2", &a, &[202, 200]) {
            return;
        }
        let started = Instant::now();
        let mut switched = None;
        while started.elapsed() < self.opts.ready_timeout {
            let a = self
                .send(Method::POST, &path, Auth::None, Body::Empty)
                .await;
            if a.body.contains("CONFORMANCE_GENERATION=2") {
                switched = Some(started.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.record(
            "7.1 redeploy",
            "generation 2 answers",
            format!("within {}s", self.opts.ready_timeout.as_secs()),
            match switched {
                Some(t) => format!("after {:.1}s", t.as_secs_f64()),
                None => "never".into(),
            },
            switched.is_some(),
        );
        if switched.is_none() {
            return;
        }
        let mut stale = 0;
        let mut failed = 0;
        for _ in 0..20 {
            let a = self
                .send(Method::POST, &path, Auth::None, Body::Empty)
                .await;
            if a.code() != 200 {
                failed += 1;
            } else if !a.body.contains("CONFORMANCE_GENERATION=2") {
                stale += 1;
            }
        }
        self.record(
            "7.1 redeploy",
            "20 invocations after the switch reach only generation 2",
            "0 stale, 0 failed".into(),
            format!("{stale} stale, {failed} failed"),
            stale == 0 && failed == 0,
        );
    }

    /// §7.8 logs and the 422 row of the matrix.
    async fn logs(&mut self, name: &str) {
        let ns = self.opts.namespace.clone();
        let a = self
            .expect(
                "7.8 logs",
                "GET /system/logs?follow=false&tail=5",
                &[200],
                Method::GET,
                &format!("/system/logs?follow=false&name={name}&namespace={ns}&tail=5"),
                Body::Empty,
            )
            .await;
        if a.passed {
            let bad: Vec<&str> = a
                .body
                .lines()
                .filter(|l| !l.trim().is_empty())
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .map(|v| !(v["name"].is_string() && v["text"].is_string()))
                        .unwrap_or(true)
                })
                .collect();
            self.record(
                "1.3.10 logs",
                "every line is a JSON message with name and text",
                "0 bad lines".into(),
                format!("{} bad lines", bad.len()),
                bad.is_empty(),
            );
        }
        self.expect(
            "1.4 matrix",
            "logs with an unparseable tail",
            &[422],
            Method::GET,
            &format!("/system/logs?follow=false&name={name}&namespace={ns}&tail=abc"),
            Body::Empty,
        )
        .await;
    }

    /// §7.8 secrets and their rows of the matrix.
    async fn secrets(&mut self) {
        let ns = self.opts.namespace.clone();
        let s = self.secret.clone();
        let value = "conformance-value";
        let body = json!({"name": s, "namespace": ns, "value": value});
        self.expect(
            "7.8 secrets",
            "create",
            &[202, 200, 201],
            Method::POST,
            "/system/secrets",
            Body::Json(body.clone()),
        )
        .await;
        self.expect(
            "1.4 matrix",
            "create an existing secret",
            &[409],
            Method::POST,
            "/system/secrets",
            Body::Json(body.clone()),
        )
        .await;
        self.expect(
            "7.8 secrets",
            "update",
            &[202, 200],
            Method::PUT,
            "/system/secrets",
            Body::Json(body),
        )
        .await;
        let a = self
            .expect(
                "7.8 secrets",
                "list",
                &[200],
                Method::GET,
                &format!("/system/secrets?namespace={ns}"),
                Body::Empty,
            )
            .await;
        if a.passed {
            let listed = a
                .json()
                .and_then(|v| v.as_array().cloned())
                .is_some_and(|l| l.iter().any(|e| e["name"] == s.as_str()));
            self.record(
                "7.8 secrets",
                "the list names the secret and never shows its value",
                "named, no value".into(),
                format!(
                    "{}, {}",
                    if listed { "named" } else { "not named" },
                    if a.body.contains(value) {
                        "value shown"
                    } else {
                        "no value"
                    }
                ),
                listed && !a.body.contains(value),
            );
        }
        let delete = json!({"name": s, "namespace": ns});
        self.expect(
            "7.8 secrets",
            "remove",
            &[202, 200, 204],
            Method::DELETE,
            "/system/secrets",
            Body::Json(delete.clone()),
        )
        .await;
        self.expect(
            "1.4 matrix",
            "remove a missing secret",
            &[404],
            Method::DELETE,
            "/system/secrets",
            Body::Json(delete),
        )
        .await;
        self.expect(
            "1.4 matrix",
            "update a missing secret",
            &[404],
            Method::PUT,
            "/system/secrets",
            Body::Json(json!({"name": s, "namespace": ns, "value": value})),
        )
        .await;
    }

    /// §7.4 and what follows a removal.
    async fn remove_flow(&mut self, name: &str) {
        let ns = self.opts.namespace.clone();
        let body = json!({"functionName": name, "namespace": ns});
        self.expect(
            "7.4 remove",
            "DELETE /system/functions",
            &[202, 200, 201],
            Method::DELETE,
            "/system/functions",
            Body::Json(body.clone()),
        )
        .await;
        self.expect(
            "1.4 matrix",
            "remove a missing function",
            &[404],
            Method::DELETE,
            "/system/functions",
            Body::Json(body),
        )
        .await;
        self.expect_with(
            "7.4 remove",
            "invoke after removal",
            &[404, 503],
            Method::POST,
            &format!("/function/{name}.{ns}"),
            Auth::None,
            Body::Raw("text/plain", "hi\n"),
        )
        .await;
        self.expect(
            "7.4 remove",
            "status after removal",
            &[404],
            Method::GET,
            &format!("/system/function/{name}?{}", self.qs()),
            Body::Empty,
        )
        .await;
    }

    /// Removes what the run created; errors are ignored (most are already gone).
    async fn clean_up(&self) {
        let ns = &self.opts.namespace;
        for name in [&self.echo, &self.env] {
            let body = json!({"functionName": name, "namespace": ns});
            self.system(Method::DELETE, "/system/functions", Body::Json(body))
                .await;
        }
        let body = json!({"name": self.secret, "namespace": ns});
        self.system(Method::DELETE, "/system/secrets", Body::Json(body))
            .await;
    }
}

/// "present", or the FunctionStatus fields faas-cli reads that are missing or mistyped. Counts
/// may be left out when zero (Go's `omitempty`, which the reference providers use).
fn status_fields_missing(f: &Value) -> String {
    let count = |v: &Value| v.is_null() || v.as_f64().is_some_and(|n| n >= 0.0);
    let missing: Vec<&str> = [
        ("name", f["name"].is_string()),
        ("image", f["image"].is_string()),
        ("replicas", count(&f["replicas"])),
        ("availableReplicas", count(&f["availableReplicas"])),
        ("invocationCount", count(&f["invocationCount"])),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(k, _)| k)
    .collect();
    if missing.is_empty() {
        "present".into()
    } else {
        format!("missing or mistyped: {}", missing.join(", "))
    }
}
