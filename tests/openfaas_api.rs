//! Replays the request sequences of faas-cli, the Terraform provider and the OpenFaaS gateway
//! (captured bodies and headers) against the real binary, asserting status codes and JSON shapes.

mod common;

use std::time::Duration;

use common::{echo_function, poll, Server};
use reqwest::Method;
use serde_json::{json, Value};

const FAAS_CLI_UA: &str = "faas-cli/0.18.12";

#[tokio::test]
async fn faas_cli_deploy_is_put_then_post_and_update_keeps_replicas() {
    let s = Server::start();
    // faas-cli deploy with flags (captured body), never logged in: empty Bearer header.
    let body = json!({"service":"figlet","image":"ghcr.io/openfaas/figlet:latest","namespace":"openfaas-fn","envProcess":"cat","envVars":{"write_debug":"true"},"constraints":["node.platform.os == linux"],"labels":{"com.openfaas.scale.max":"10","com.openfaas.scale.min":"2"},"annotations":{"topic":"cron"},"readOnlyRootFilesystem":true});
    let put = s
        .http
        .put(s.url("/system/functions"))
        .header("User-Agent", FAAS_CLI_UA)
        .header("Authorization", "Bearer")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 404, "PUT of an unknown function must be 404");
    let post = s
        .http
        .post(s.url("/system/functions"))
        .header("Authorization", "Bearer")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 202);

    // Initial replicas come from com.openfaas.scale.min.
    let status = s.wait_available("figlet", 2).await;
    assert_eq!(status["replicas"], 2);
    assert_eq!(status["name"], "figlet");
    assert_eq!(status["namespace"], "openfaas-fn");
    assert_eq!(status["image"], "ghcr.io/openfaas/figlet:latest");
    assert_eq!(status["envProcess"], "cat");
    assert_eq!(status["labels"], body["labels"]);
    assert_eq!(status["annotations"], body["annotations"]);
    assert_eq!(status["constraints"], body["constraints"]);
    assert_eq!(status["readOnlyRootFilesystem"], true);
    let created = status["createdAt"].as_str().unwrap();
    chrono::DateTime::parse_from_rfc3339(created).expect("createdAt is RFC 3339");

    // A second POST of the same name is a conflict, not a silent upsert.
    assert_eq!(s.deploy(body.clone()).await.status(), 409);

    // Scale up, then update: the update keeps the current count.
    let scale = s
        .system(Method::POST, "/system/scale-function/figlet")
        .json(&json!({"serviceName":"figlet","replicas":3,"namespace":"openfaas-fn"}))
        .send()
        .await
        .unwrap();
    assert_eq!(scale.status(), 202);
    s.wait_available("figlet", 3).await;
    let mut updated = body.clone();
    updated["envVars"] = json!({"write_debug": "false"});
    let put = s
        .system(Method::PUT, "/system/functions")
        .json(&updated)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 202);
    let status = s.wait_available("figlet", 3).await;
    assert_eq!(status["replicas"], 3);
    assert_eq!(status["envVars"], json!({"write_debug": "false"}));
}

#[tokio::test]
async fn terraform_body_with_nulls_and_unknown_fields_round_trips() {
    let s = Server::start();
    let body = json!({"service":"tf","image":"i","network":"","envProcess":"cat","envVars":null,"constraints":null,"secrets":null,"labels":null,"annotations":null,"limits":null,"requests":null,"readOnlyRootFilesystem":false,"registryAuth":"x","someFutureField":{"a":1}});
    let put = s
        .system(Method::PUT, "/system/functions")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 404);
    assert_eq!(s.deploy(body).await.status(), 202);
    // Terraform reads without a namespace.
    let (code, status) = s.status("tf").await;
    assert_eq!(code, 200);
    let obj = status.as_object().unwrap();
    // Nothing injected: no labels or annotations appear that were not deployed.
    assert!(!obj.contains_key("labels"), "{status}");
    assert!(!obj.contains_key("annotations"), "{status}");
    assert!(!obj.contains_key("readOnlyRootFilesystem"), "{status}");
    assert_eq!(status["image"], "i");
    // Terraform deletes with the name only.
    let del = s
        .system(Method::DELETE, "/system/functions")
        .json(&json!({"functionName":"tf"}))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 202);
    assert_eq!(s.status("tf").await.0, 404);
}

#[tokio::test]
async fn list_describe_invoke_and_metrics() {
    let s = Server::start();
    let list: Value = s.get_json("/system/functions").await;
    assert_eq!(list, json!([]), "an empty list is [], never null");

    assert_eq!(s.deploy(echo_function("echo")).await.status(), 202);
    s.wait_available("echo", 1).await;

    // Current faas-cli always appends the namespace; older ones do not.
    let r = s
        .http
        .post(s.url("/function/echo.openfaas-fn"))
        .header("Content-Type", "text/plain")
        .header("User-Agent", "faas-cli/0.18.12 (openfaas; linux; amd64)")
        .body("hi\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-call-id"));
    assert!(r.headers().contains_key("x-start-time"));
    assert!(r.headers().contains_key("x-duration-seconds"));
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.text().await.unwrap(), "hi\n");
    assert_eq!(s.invoke("echo", "again").await, (200, "again".to_string()));

    // describe: GET /system/function/NAME?usage=1 and the list for invocationCount.
    let described = s
        .system(Method::GET, "/system/function/echo?usage=1")
        .send()
        .await
        .unwrap();
    assert_eq!(described.status(), 200);
    assert_eq!(described.headers()["content-type"], "application/json");
    let list: Value = s.get_json("/system/functions?namespace=openfaas-fn").await;
    assert_eq!(list[0]["name"], "echo");
    assert_eq!(list[0]["invocationCount"], json!(2), "integer, not 2.0");
    assert_eq!(list[0]["replicas"], json!(1));

    let metrics = s.metrics().await;
    assert_eq!(
        common::sample(
            &metrics,
            r#"gateway_function_invocation_total{code="200",datacenter="home",function_name="echo.openfaas-fn"}"#
        ),
        Some(2.0),
        "{metrics}"
    );
    for series in [
        r#"gateway_function_invocation_started{function_name="echo.openfaas-fn"}"#,
        r#"gateway_functions_seconds_count{code="200",datacenter="home",function_name="echo.openfaas-fn"}"#,
        r#"gateway_service_count{function_name="echo.openfaas-fn"}"#,
        r#"faastastic_function_replicas{datacenter="home",function_name="echo.openfaas-fn",state="ready"}"#,
    ] {
        assert!(
            common::sample(&metrics, series).is_some(),
            "missing {series} in\n{metrics}"
        );
    }
    assert!(metrics.contains(r#"gateway_functions_seconds_bucket{code="200",datacenter="home",function_name="echo.openfaas-fn",le="0.005"}"#));

    // Unknown functions: 404 everywhere.
    assert_eq!(s.invoke("nope", "").await.0, 404);
    assert_eq!(s.status("nope").await.0, 404);
    let scale = s
        .system(Method::POST, "/system/scale-function/nope")
        .json(&json!({"serviceName":"nope","replicas":1}))
        .send()
        .await
        .unwrap();
    assert_eq!(scale.status(), 404);
}

#[tokio::test]
async fn gateway_style_scale_with_namespace_in_query_and_scale_to_zero() {
    let s = Server::start();
    assert_eq!(s.deploy(echo_function("zero")).await.status(), 202);
    s.wait_available("zero", 1).await;
    // The gateway's alert handler: namespace in the query, body without it.
    let r = s
        .system(
            Method::GET,
            "/system/function/zero?namespace=openfaas-fn&usage=false",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .system(
            Method::POST,
            "/system/scale-function/zero?namespace=openfaas-fn",
        )
        .json(&json!({"serviceName":"zero","replicas":0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let ok = poll(Duration::from_secs(20), || async {
        let (_, st) = s.status("zero").await;
        st.get("replicas").is_none() && st.get("availableReplicas").is_none()
    })
    .await;
    assert!(ok, "replicas and availableReplicas are omitted at zero");
    // The first invocation scales it back up to the minimum.
    assert_eq!(s.invoke("zero", "wake").await, (200, "wake".to_string()));
    assert_eq!(s.status("zero").await.1["replicas"], 1);
}

/// `com.faastastic.scale.initial=0` deploys a function dormant: no replica runs until its
/// first invocation, which wakes it to min.
#[tokio::test]
async fn a_function_deployed_dormant_wakes_on_its_first_invocation() {
    let s = Server::start();
    let mut body = echo_function("dormant");
    body["labels"] = json!({"com.faastastic.scale.initial": "0", "com.openfaas.scale.min": "2"});
    assert_eq!(s.deploy(body).await.status(), 202);
    let (code, st) = s.status("dormant").await;
    assert_eq!(code, 200);
    assert!(st.get("replicas").is_none(), "{st}");
    assert_eq!(s.available("dormant").await, 0);
    assert_eq!(s.invoke("dormant", "wake").await, (200, "wake".to_string()));
    assert_eq!(s.status("dormant").await.1["replicas"], 2);
    // A value that is not a count is refused, naming the label.
    let mut bad = echo_function("dormant-bad");
    bad["labels"] = json!({"com.faastastic.scale.initial": "none"});
    let r = s.deploy(bad).await;
    assert_eq!(r.status(), 400);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("com.faastastic.scale.initial"));
}

#[tokio::test]
async fn async_invoke_runs_in_background_and_calls_back() {
    let s = Server::start();
    assert_eq!(s.deploy(echo_function("later")).await.status(), 202);
    s.wait_available("later", 1).await;

    // A callback receiver on loopback.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let callback = format!("http://{}/done", listener.local_addr().unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let app = axum::Router::new().route(
        "/done",
        axum::routing::post(move |headers: http::HeaderMap, body: String| {
            let tx = tx.clone();
            async move {
                let h = |k: &str| {
                    headers
                        .get(k)
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default()
                };
                let _ = tx
                    .send((
                        h("x-function-status"),
                        h("x-call-id"),
                        h("x-function-name"),
                        body,
                    ))
                    .await;
                "ok"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let r = s
        .http
        .post(s.url("/async-function/later.openfaas-fn"))
        .header("X-Callback-Url", &callback)
        .body("queued work")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let call_id = r.headers()["x-call-id"].to_str().unwrap().to_string();
    assert!(r.text().await.unwrap().is_empty());
    let (status, cb_call_id, name, body) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("callback within 20 s")
        .unwrap();
    assert_eq!(status, "200");
    assert_eq!(cb_call_id, call_id);
    assert_eq!(name, "later");
    assert_eq!(body, "queued work");

    // A bad callback URL is refused up front; GET is not routed for async.
    let r = s
        .http
        .post(s.url("/async-function/later"))
        .header("X-Callback-Url", "not a url")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = s
        .http
        .get(s.url("/async-function/later"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn async_queue_full_answers_429() {
    let s = Server::with(common::Options {
        config: Some("[async]\nqueue_capacity = 1\nworkers = 1\n[local]\nexec_timeout_secs = 30\n"),
        ..Default::default()
    });
    let slow = json!({"service":"slow","image":"x","envProcess":"sleep 3"});
    assert_eq!(s.deploy(slow).await.status(), 202);
    s.wait_available("slow", 1).await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        let r = s
            .http
            .post(s.url("/async-function/slow"))
            .send()
            .await
            .unwrap();
        codes.push(r.status().as_u16());
        if r.status() == 429 {
            assert_eq!(r.headers()["retry-after"], "1");
        }
    }
    assert!(codes.contains(&202), "{codes:?}");
    assert!(codes.contains(&429), "a full queue answers 429: {codes:?}");
}

#[tokio::test]
async fn secrets_crud_and_mounting() {
    let s = Server::start();
    let post = |body: Value| s.system(Method::POST, "/system/secrets").json(&body).send();
    // faas-cli secret create api-key --from-literal v
    assert_eq!(
        post(json!({"name":"api-key","value":"s3cr3t"}))
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(
        post(json!({"name":"api-key","value":"x"}))
            .await
            .unwrap()
            .status(),
        409
    );
    // --from-file sends rawValue (wins) and value.
    assert_eq!(
        post(
            json!({"name":"cert","namespace":"openfaas-fn","value":"\u{1}\u{2}","rawValue":"AQI="})
        )
        .await
        .unwrap()
        .status(),
        202
    );
    assert_eq!(
        post(json!({"name":"../etc","value":"x"}))
            .await
            .unwrap()
            .status(),
        400
    );
    let list: Value = s.get_json("/system/secrets").await;
    assert_eq!(
        list,
        json!([{"name":"api-key","namespace":"openfaas-fn"},{"name":"cert","namespace":"openfaas-fn"}]),
        "values are never listed"
    );
    let put = s
        .system(Method::PUT, "/system/secrets")
        .json(&json!({"name":"api-key","value":"rotated"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 202);
    let put = s
        .system(Method::PUT, "/system/secrets")
        .json(&json!({"name":"missing","value":"x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 404);

    // A function reads its secret from $secret_mount_path, a file only it may read.
    let reader = json!({"service":"reader","image":"x",
        "envProcess":"sh -c 'cat $secret_mount_path/api-key; stat -c %a $secret_mount_path/api-key'",
        "secrets":["api-key"]});
    assert_eq!(s.deploy(reader).await.status(), 202);
    s.wait_available("reader", 1).await;
    // Its own user's alone as root (a user per function), else the server's.
    let mode = if common::is_root() { 400 } else { 600 };
    assert_eq!(
        s.invoke("reader", "").await,
        (200, format!("rotated{mode}\n"))
    );
    // A deployment naming a missing secret is refused with its name.
    let r = s
        .deploy(json!({"service":"bad","image":"x","envProcess":"cat","secrets":["nope"]}))
        .await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("nope"));

    let del = |name: &str| {
        s.system(Method::DELETE, "/system/secrets")
            .json(&json!({"name": name}))
            .send()
    };
    assert_eq!(del("cert").await.unwrap().status(), 202);
    assert_eq!(del("cert").await.unwrap().status(), 404);
    // A secret a deployed function uses cannot be pulled from under it.
    let r = del("api-key").await.unwrap();
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("reader"));
}

#[tokio::test]
async fn logs_stream_ndjson_with_tail_and_follow() {
    let s = Server::start();
    let f = json!({"service":"talker","image":"x","envProcess":"sh -c 'echo said-$(cat) >&2; echo ok'"});
    assert_eq!(s.deploy(f).await.status(), 202);
    s.wait_available("talker", 1).await;
    assert_eq!(s.invoke("talker", "one").await.0, 200);
    assert_eq!(s.invoke("talker", "two").await.0, 200);

    let history = || async {
        let r = s
            .system(
                Method::GET,
                "/system/logs?follow=false&name=talker&namespace=openfaas-fn&tail=5",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/x-ndjson");
        r.text().await.unwrap()
    };
    let ok = poll(Duration::from_secs(10), || async {
        history().await.contains("said-two")
    })
    .await;
    assert!(ok, "logs never showed the function's stderr");
    for line in history().await.lines() {
        let m: Value = serde_json::from_str(line).unwrap();
        for key in ["name", "namespace", "instance", "timestamp", "text"] {
            assert!(m.get(key).is_some(), "{key} missing in {line}");
        }
        assert_eq!(m["name"], "talker");
        chrono::DateTime::parse_from_rfc3339(m["timestamp"].as_str().unwrap()).unwrap();
    }
    let tail1 = s
        .system_text("/system/logs?follow=false&name=talker&tail=1")
        .await;
    assert_eq!(tail1.lines().count(), 1);

    // follow: a new line arrives on the open stream.
    let mut stream = s
        .system(Method::GET, "/system/logs?follow=true&name=talker&tail=1")
        .send()
        .await
        .unwrap();
    assert_eq!(s.invoke("talker", "three").await.0, 200);
    let mut seen = String::new();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(chunk)) = stream.chunk().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains("said-three") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(got, Ok(true), "followed stream: {seen}");

    // Bad parameters are 422, unknown functions 404.
    for q in ["tail=x", "since=yesterday"] {
        let r = s
            .system(Method::GET, &format!("/system/logs?name=talker&{q}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{q}");
    }
    let r = s
        .system(Method::GET, "/system/logs?name=ghost")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn namespaces_crud_and_isolation() {
    let s = Server::start();
    let names: Value = s.get_json("/system/namespaces").await;
    assert_eq!(names, json!(["openfaas-fn"]));
    let ns = json!({"name":"dev","labels":{"openfaas":"1"},"annotations":{"openfaas":"1"}});
    let create = || {
        s.system(Method::POST, "/system/namespace/")
            .json(&ns)
            .send()
    };
    assert_eq!(create().await.unwrap().status(), 201);
    assert_eq!(create().await.unwrap().status(), 409);
    let got: Value = s.get_json("/system/namespace/dev").await;
    assert_eq!(got, ns);
    let put = s
        .system(Method::PUT, "/system/namespace/dev")
        .json(&json!({"name":"dev","labels":{"openfaas":"1","team":"a"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 202);

    // Same name in two namespaces: two functions.
    let mut in_dev = echo_function("same");
    in_dev["namespace"] = json!("dev");
    in_dev["envProcess"] = json!("echo dev");
    assert_eq!(s.deploy(in_dev).await.status(), 202);
    let mut in_default = echo_function("same");
    in_default["envProcess"] = json!("echo default");
    assert_eq!(s.deploy(in_default).await.status(), 202);
    s.wait_available("same.dev", 1).await;
    s.wait_available("same", 1).await;
    assert_eq!(s.invoke("same.dev", "").await.1, "dev\n");
    assert_eq!(s.invoke("same.openfaas-fn", "").await.1, "default\n");
    let dev_list: Value = s.get_json("/system/functions?namespace=dev").await;
    assert_eq!(dev_list.as_array().unwrap().len(), 1);
    assert_eq!(dev_list[0]["namespace"], "dev");

    // Unknown namespace: 400 naming it.
    let r = s
        .system(Method::GET, "/system/functions?namespace=ghost")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("ghost"));

    // A namespace with functions cannot be deleted; once empty it can (old clients put the
    // namespace of a function delete in the query).
    let del_ns = || {
        s.system(Method::DELETE, "/system/namespace/dev")
            .json(&json!({"name":"dev"}))
            .send()
    };
    assert_eq!(del_ns().await.unwrap().status(), 409);
    let del = s
        .system(Method::DELETE, "/system/functions?namespace=dev")
        .json(&json!({"functionName":"same"}))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 202);
    assert_eq!(
        s.status("same").await.0,
        200,
        "the default namespace's copy stays"
    );
    assert_eq!(del_ns().await.unwrap().status(), 202);
    assert_eq!(del_ns().await.unwrap().status(), 404);
}

#[tokio::test]
async fn info_shapes_by_role() {
    let s = Server::start();
    let info: Value = s.get_json("/system/info").await;
    // faas-cli version dereferences these without nil checks.
    assert!(info["provider"]["version"]["release"].is_string(), "{info}");
    assert!(info["provider"]["provider"].is_string());
    assert_eq!(info["provider"]["orchestration"], "local");
    assert!(info["version"]["sha"].is_string());
    assert!(info["arch"].is_string());

    let p = Server::with(common::Options {
        config: Some("role = \"provider\"\n"),
        ..Default::default()
    });
    let info: Value = p.get_json("/system/info").await;
    assert_eq!(info["provider"], "faastastic");
    assert!(info["version"]["release"].is_string());
}

#[tokio::test]
async fn remove_then_404() {
    let s = Server::start();
    assert_eq!(s.deploy(echo_function("gone")).await.status(), 202);
    let del = || {
        s.system(Method::DELETE, "/system/functions")
            .json(&json!({"functionName":"gone","namespace":"openfaas-fn"}))
            .send()
    };
    assert_eq!(del().await.unwrap().status(), 202);
    assert_eq!(del().await.unwrap().status(), 404);
    assert_eq!(s.invoke("gone", "").await.0, 404);
    let r = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn async_queue_bounds_the_bytes_it_holds() {
    let s = Server::with(common::Options {
        config: Some(
            "[async]\nmax_queued_bytes = 1000\nworkers = 1\n[local]\nexec_timeout_secs = 30\n",
        ),
        ..Default::default()
    });
    assert_eq!(
        s.deploy(json!({"service":"slow","image":"x","envProcess":"sleep 3"}))
            .await
            .status(),
        202
    );
    s.wait_available("slow", 1).await;
    let submit = |n: usize| {
        s.http
            .post(s.url("/async-function/slow"))
            .body("x".repeat(n))
            .send()
    };
    assert_eq!(submit(600).await.unwrap().status(), 202);
    let r = submit(600).await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("async.max_queued_bytes"));
    assert_eq!(
        submit(300).await.unwrap().status(),
        202,
        "what fits is still accepted"
    );
}

/// The README's own start (`serve` without `--data-dir`) keeps its data directory relative to
/// where it runs; a replica, which runs in its own directory, still finds its secrets.
#[tokio::test]
async fn secrets_are_readable_when_the_data_directory_is_relative() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::with(common::Options {
        data_dir: Some(std::path::Path::new("faastastic-data")),
        cwd: Some(dir.path()),
        ..Default::default()
    });
    let r = s
        .system(Method::POST, "/system/secrets")
        .json(&json!({"name":"api-key","value":"s3cret"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let reader = json!({"service":"reader","image":"x",
        "envProcess":"sh -c 'echo $secret_mount_path; cat $secret_mount_path/api-key'",
        "secrets":["api-key"]});
    assert_eq!(s.deploy(reader).await.status(), 202);
    s.wait_available("reader", 1).await;
    let (status, body) = s.invoke("reader", "").await;
    assert_eq!(status, 200, "{body}");
    let (path, value) = body.split_once('\n').unwrap();
    assert!(
        path.starts_with('/'),
        "an absolute secret_mount_path: {path}"
    );
    // As root, functions' files live apart from the data directory (a user per function),
    // and in a sandbox the secrets are at the OpenFaaS path.
    if common::is_root() {
        assert!(
            path == "/var/openfaas/secrets" || path.starts_with("/run/faastastic/"),
            "{path}"
        );
    } else {
        assert!(path.starts_with(dir.path().to_str().unwrap()), "{path}");
    }
    assert_eq!(value, "s3cret");
}

/// Scaling labels that contradict each other are refused at deploy, each complaint once, and
/// only about what the user set.
#[tokio::test]
async fn contradicting_scaling_labels_are_refused_at_deploy_once_each() {
    let s = Server::with(common::Options {
        config: Some("[limits]\nmax_replicas = 3\n"),
        ..Default::default()
    });
    let deploy = |labels: Value| {
        let mut f = echo_function("bounds");
        f["labels"] = labels;
        s.deploy(f)
    };
    let r = deploy(json!({"com.openfaas.scale.min": "3", "com.openfaas.scale.max": "2"})).await;
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("com.openfaas.scale.min") && text.contains("com.openfaas.scale.max"),
        "{text}"
    );
    let r = deploy(json!({"com.openfaas.scale.min": "abc"})).await;
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert_eq!(
        text.matches("com.openfaas.scale.min").count(),
        1,
        "one complaint about min: {text}"
    );
    let r = deploy(json!({"com.openfaas.scale.min": "5"})).await;
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.contains("limits.max_replicas"), "{text}");
    assert!(
        !text.contains("com.faastastic.scale.initial"),
        "initial was not set: {text}"
    );
    // Nothing was deployed by the refusals; bare-number durations and yes/no flags are taken.
    let r = deploy(
        json!({"com.openfaas.scale.min": "1", "com.openfaas.scale.max": "2",
        "com.faastastic.scale.down-cooldown": "10", "com.faastastic.scale.resolved-to-min": "yes"}),
    )
    .await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
}

/// One rule for a function reference on every route: `name` or `name.namespace`, both
/// DNS-1123 labels. A name that breaks it is a 400 naming the rule everywhere (invoking
/// `Upper` or `under_score` used to be a 404, as if such a function could exist); a valid
/// name that is not deployed is a 404 everywhere.
#[tokio::test]
async fn every_route_reads_a_function_reference_by_one_rule() {
    let s = Server::start();
    assert_eq!(s.deploy(echo_function("known")).await.status(), 202);
    let routes = |name: &str| {
        vec![
            (Method::POST, format!("/function/{name}"), Value::Null),
            (Method::POST, format!("/async-function/{name}"), Value::Null),
            (Method::GET, format!("/system/function/{name}"), Value::Null),
            (
                Method::POST,
                format!("/system/scale-function/{name}"),
                json!({"serviceName": name, "replicas": 1}),
            ),
            (
                Method::GET,
                format!("/system/logs?name={name}"),
                Value::Null,
            ),
            (
                Method::POST,
                "/system/autoscaling/pause".to_string(),
                json!({"function": name}),
            ),
        ]
    };
    for bad in ["Upper", "under_score", "a.b.c", "-edge"] {
        for (method, path, body) in routes(bad) {
            let mut req = s.system(method.clone(), &path);
            if !body.is_null() {
                req = req.json(&body);
            }
            let r = req.send().await.unwrap();
            let code = r.status().as_u16();
            let text = r.text().await.unwrap();
            assert_eq!(code, 400, "{method} {path}: {text}");
            assert!(
                text.contains("lower case alphanumeric characters or '-'"),
                "{method} {path}: {text}"
            );
        }
        let r = s
            .system(Method::GET, &format!("/system/scale-events?function={bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "scale-events filter {bad}");
    }
    for (method, path, body) in routes("missing") {
        let mut req = s.system(method.clone(), &path);
        if !body.is_null() {
            req = req.json(&body);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 404, "{method} {path}");
    }
    assert_eq!(
        s.invoke("known.openfaas-fn", "hi").await,
        (200, "hi".to_string())
    );
}
