//! Cross-site request protection for every guarded route. A browser that holds the server's
//! Basic credentials (someone logged in to `/ui/`) sends them with any request a page from
//! another site makes it send, so a state change (any method but GET, HEAD and OPTIONS) is
//! refused with 403 when the browser says it comes from elsewhere: `Sec-Fetch-Site` other than
//! `same-origin` or `none`, or, from browsers that do not send that header, an `Origin` whose
//! host and port are none of the request's own: its `Host` (or, over HTTP/2, the URI's
//! authority) or the `X-Forwarded-Host` a proxy in front set (a page cannot add that header
//! to a cross-site request without a CORS preflight, which is never granted). Clients that
//! are not browsers (faas-cli, Terraform, Alertmanager, curl) send neither header and are not
//! affected.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, Method, StatusCode};

use super::error::ApiError;

/// Why a request counts as cross-site, or `None` when it may go on. `authority` is the
/// request URI's (HTTP/2 carries the host there instead of in `Host`).
pub fn cross_site(method: &Method, headers: &HeaderMap, authority: Option<&str>) -> Option<String> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        return match site.as_bytes() {
            b"same-origin" | b"none" => None,
            other => Some(format!(
                "Sec-Fetch-Site: {}",
                String::from_utf8_lossy(other)
            )),
        };
    }
    let origin = headers.get(header::ORIGIN)?;
    let origin = origin.to_str().unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .filter(|rest| !rest.is_empty() && !rest.contains('/'));
    let text = |name| {
        headers
            .get(name)
            .and_then(|h: &http::HeaderValue| h.to_str().ok())
    };
    // X-Forwarded-Host may list every proxy's; the first is the client's.
    let forwarded = text("x-forwarded-host").and_then(|h| h.split(',').next().map(str::trim));
    let own = [text(header::HOST.as_str()), authority, forwarded];
    match origin_host {
        Some(h) if own.into_iter().flatten().any(|o| h.eq_ignore_ascii_case(o)) => None,
        _ => Some(format!("Origin: {origin}")),
    }
}

/// Middleware: answers 403 to a cross-site state change before anything else looks at it.
pub async fn same_origin_only(req: Request, next: Next) -> Response {
    let authority = req.uri().authority().map(|a| a.as_str());
    match cross_site(req.method(), req.headers(), authority) {
        None => next.run(req).await,
        Some(why) => ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "cross-site request refused ({why}): {} {} changes state and is accepted only \
                 from this server's own pages or from clients that are not browsers",
                req.method(),
                req.uri().path()
            ),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn browsers_from_elsewhere_are_refused_and_other_clients_are_not() {
        let post = Method::POST;
        // faas-cli, curl, Alertmanager: neither header.
        assert_eq!(
            cross_site(&post, &headers(&[("host", "gw:8080")]), None),
            None
        );
        for site in ["same-origin", "none"] {
            assert_eq!(
                cross_site(&post, &headers(&[("sec-fetch-site", site)]), None),
                None
            );
        }
        for site in ["cross-site", "same-site"] {
            let why = cross_site(&post, &headers(&[("sec-fetch-site", site)]), None).unwrap();
            assert!(why.contains(site), "{why}");
        }
        // Sec-Fetch-Site wins over a matching Origin.
        assert!(cross_site(
            &post,
            &headers(&[
                ("sec-fetch-site", "cross-site"),
                ("origin", "http://gw:8080"),
                ("host", "gw:8080")
            ]),
            None
        )
        .is_some());
        let origin = |o: &'static str| {
            cross_site(
                &Method::DELETE,
                &headers(&[("origin", o), ("host", "gw:8080")]),
                None,
            )
        };
        assert_eq!(origin("http://gw:8080"), None);
        assert_eq!(origin("https://GW:8080"), None);
        for bad in [
            "http://gw:8081",
            "http://evil.example",
            "null",
            "http://gw:8080/x",
            "http://gw:8080.evil.example",
        ] {
            assert!(origin(bad).is_some(), "{bad}");
        }
        // Reading is never refused (the browser keeps the answer from the other site).
        assert_eq!(
            cross_site(
                &Method::GET,
                &headers(&[("sec-fetch-site", "cross-site")]),
                None
            ),
            None
        );
        // Behind a proxy that rewrites Host (the OpenFaaS gateway, nginx's proxy_pass), the
        // page's origin is the proxy's, which it names in X-Forwarded-Host.
        let proxied = headers(&[
            ("origin", "http://gateway:8080"),
            ("host", "faastastic:8081"),
            ("x-forwarded-host", "gateway:8080, edge:80"),
        ]);
        assert_eq!(cross_site(&post, &proxied, None), None);
        let elsewhere = headers(&[
            ("origin", "http://evil.example"),
            ("host", "faastastic:8081"),
            ("x-forwarded-host", "gateway:8080"),
        ]);
        assert!(cross_site(&post, &elsewhere, None).is_some());
        // HTTP/2: no Host header, the authority is the URI's.
        let h2 = headers(&[("origin", "https://gw:8443")]);
        assert_eq!(cross_site(&post, &h2, Some("gw:8443")), None);
        assert!(cross_site(&post, &h2, None).is_some());
        assert!(cross_site(&post, &h2, Some("other:8443")).is_some());
    }
}
