//! `GET /system/logs`: NDJSON `Message` lines, history then (with `follow`) live lines.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::Response;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use http::{header, StatusCode};
use tokio_stream::wrappers::BroadcastStream;

use super::error::{ApiError, ApiResult};
use super::AppState;
use crate::platform::{LogMessage, LogQuery};

fn unparseable(what: &str, value: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        format!("could not parse the log request: {what} {value:?}"),
    )
}

/// Reads the query as faas-provider does: `tail` ≤ 0 means unlimited, `since` is RFC 3339,
/// an unparseable `follow` is false.
fn parse_query(q: &HashMap<String, String>) -> Result<LogQuery, ApiError> {
    let tail = match q.get("tail").map(|t| t.trim()).filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => {
            let n: i64 = t.parse().map_err(|_| unparseable("tail", t))?;
            (n > 0).then_some(n as usize)
        }
    };
    let since = match q.get("since").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            DateTime::parse_from_rfc3339(s)
                .map_err(|_| unparseable("since", s))?
                .with_timezone(&Utc),
        ),
    };
    Ok(LogQuery {
        instance: q.get("instance").filter(|i| !i.is_empty()).cloned(),
        tail,
        since,
        follow: q
            .get("follow")
            .is_some_and(|f| matches!(f.as_str(), "1" | "t" | "T" | "true" | "TRUE" | "True")),
    })
}

fn line(m: &LogMessage) -> Result<bytes::Bytes, std::io::Error> {
    let mut v = serde_json::to_vec(m).map_err(std::io::Error::other)?;
    v.push(b'\n');
    Ok(v.into())
}

pub async fn logs(
    State(s): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let raw = q.get("name").map(String::as_str).unwrap_or("");
    if raw.is_empty() {
        return Err(ApiError::bad_request("name: is required (?name=FUNCTION)"));
    }
    let query = parse_query(&q)?;
    let id = s
        .fleet
        .resolve_function(raw, q.get("namespace").map(String::as_str))?;
    let datacenter = s
        .fleet
        .resolve_datacenter(q.get("datacenter").map(String::as_str))?;
    s.fleet.get_in(&id, datacenter.as_deref())?;
    let sub = s
        .fleet
        .logs(&id, datacenter.as_deref(), &query)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("function {id} not found")))?;
    let history = futures::stream::iter(sub.history.into_iter().map(|m| line(&m)));
    let body = match sub.live {
        None => Body::from_stream(history),
        Some(live) => {
            let last_seq = sub.last_seq;
            let live = BroadcastStream::new(live).filter_map(move |m| {
                let keep = match m {
                    Ok(m) if m.seq > last_seq && query.matches(&m) => Some(line(&m)),
                    _ => None,
                };
                std::future::ready(keep)
            });
            Body::from_stream(history.chain(live))
        }
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .expect("static headers are valid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_like_faas_provider() {
        let lq = parse_query(&q(&[("tail", "-1"), ("follow", "true")])).unwrap();
        assert_eq!(lq.tail, None);
        assert!(lq.follow);
        let lq = parse_query(&q(&[("tail", "5"), ("follow", "maybe")])).unwrap();
        assert_eq!(lq.tail, Some(5));
        assert!(!lq.follow);
        assert!(parse_query(&q(&[("since", "2024-01-01T00:00:00Z")]))
            .unwrap()
            .since
            .is_some());
        assert_eq!(parse_query(&q(&[("tail", "x")])).unwrap_err().status, 422);
        assert_eq!(
            parse_query(&q(&[("since", "yesterday")]))
                .unwrap_err()
                .status,
            422
        );
    }
}
