//! The web UI at `/ui/`: one static page, its script and its style sheet, embedded in the
//! binary and served with the same credentials as `/system/*`. The page reads and changes
//! everything through the JSON API; nothing it shows is ever parsed as HTML (every value goes in
//! as text), and the Content-Security-Policy below allows no inline script and no request to
//! any other origin.

use axum::extract::Path;
use axum::response::{IntoResponse, Redirect, Response};
use http::{header, HeaderValue, StatusCode};

/// Scripts, styles, images and API calls from this origin only; no inline script or style
/// attribute, no plugin, no framing, no form posted elsewhere, no `<base>` rewriting.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

const INDEX: &str = include_str!("../../ui/index.html");
const SCRIPT: &str = include_str!("../../ui/app.js");
const STYLE: &str = include_str!("../../ui/app.css");

fn page(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        // The assets change with the binary; revalidating costs one small request.
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// `GET /ui`: the page lives at `/ui/`, so that its relative links resolve under it.
pub async fn redirect() -> Redirect {
    Redirect::permanent("/ui/")
}

/// `GET /ui/`
pub async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX)
}

/// `GET /ui/{asset}`
pub async fn asset(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" => page("text/javascript; charset=utf-8", SCRIPT),
        "app.css" => page("text/css; charset=utf-8", STYLE),
        _ => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("no such file in the web UI: {name}\n"),
        )
            .into_response(),
    }
}
