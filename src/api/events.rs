//! `GET /system/scale-events`: every autoscaler decision with its reason, newest first; and
//! `GET /system/trigger-events`, what became of every due time of the functions' triggers.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use http::header::CONTENT_TYPE;

use super::error::{ApiError, ApiResult};
use super::AppState;
use crate::model::function_ref;
use crate::store::EventFilter;

const MAX_LIMIT: u32 = 1000;

/// The filter a query asks for: `function` (by the one name rule), `namespace`,
/// `datacenter`, `since` (RFC 3339) and `limit` (1 to 1000, default 100).
fn filter(q: &HashMap<String, String>) -> ApiResult<EventFilter> {
    let get = |k: &str| q.get(k).map(String::as_str).filter(|v| !v.is_empty());
    // The function filter reads as every route reads a function reference.
    let (name, namespace) = match get("function") {
        Some(f) => {
            let (n, ns) = function_ref(f, get("namespace"))
                .map_err(|e| ApiError::bad_request(format!("function: {e}")))?;
            (Some(n.to_string()), ns.map(str::to_string))
        }
        None => (None, get("namespace").map(str::to_string)),
    };
    let limit = match get("limit") {
        None => 100,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "limit: {l:?} must be a number from 1 to {MAX_LIMIT}"
                ))
            })?,
    };
    let since = match get("since") {
        None => None,
        Some(t) => Some(
            DateTime::parse_from_rfc3339(t)
                .map_err(|_| {
                    ApiError::bad_request(format!("since: {t:?} is not an RFC 3339 time"))
                })?
                .with_timezone(&Utc),
        ),
    };
    Ok(EventFilter {
        name,
        namespace,
        datacenter: get("datacenter").map(str::to_string),
        since,
        limit,
    })
}

/// Stored rows are JSON objects already; adds each one's id and joins them into one array.
fn answer(rows: Result<Vec<(i64, String)>, crate::store::StoreError>) -> ApiResult<Response> {
    let rows =
        rows.map_err(|e| ApiError::new(http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut body = String::from("[");
    for (i, (id, json)) in rows.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!("{{\"id\":{id},"));
        body.push_str(json.strip_prefix('{').unwrap_or(json));
    }
    body.push(']');
    Ok(([(CONTENT_TYPE, "application/json")], body).into_response())
}

pub async fn list(
    State(s): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    answer(s.fleet_store.scale_events(filter(&q)?).await)
}

/// `GET /system/trigger-events`: every due time of every function's triggers (cron runs,
/// skipped and missed due times), newest first, with the same query as the scale events.
pub async fn triggers(
    State(s): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    answer(s.fleet_store.trigger_events(filter(&q)?).await)
}
