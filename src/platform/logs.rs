//! A bounded per-function log buffer with live subscribers, backing `/system/logs`.

use std::collections::VecDeque;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::broadcast;

/// One log line in the OpenFaaS `Message` shape (all five fields always present).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogMessage {
    pub name: String,
    pub namespace: String,
    pub instance: String,
    #[serde(serialize_with = "rfc3339_nanos")]
    pub timestamp: DateTime<Utc>,
    pub text: String,
    #[serde(skip)]
    pub seq: u64,
}

fn rfc3339_nanos<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

/// Which lines a reader wants.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub instance: Option<String>,
    /// Keep only the last `tail` lines of history (`None` = all buffered lines).
    pub tail: Option<usize>,
    pub since: Option<DateTime<Utc>>,
    pub follow: bool,
}

impl LogQuery {
    pub fn matches(&self, m: &LogMessage) -> bool {
        self.instance.as_deref().is_none_or(|i| i == m.instance)
            && self.since.is_none_or(|since| m.timestamp >= since)
    }
}

/// History that matched, and a live feed of later lines when following.
pub struct LogSubscription {
    pub history: Vec<LogMessage>,
    /// Lines after `history`; messages with `seq <= last_seq` are duplicates to skip.
    pub live: Option<broadcast::Receiver<LogMessage>>,
    pub last_seq: u64,
}

pub struct LogBuffer {
    name: String,
    namespace: String,
    capacity: usize,
    inner: Mutex<Inner>,
    /// Made by the first follower: a channel preallocates its slots, which would cost every
    /// function ~160 KB whether anyone follows its logs or not.
    live: std::sync::OnceLock<broadcast::Sender<LogMessage>>,
}

struct Inner {
    lines: VecDeque<LogMessage>,
    next_seq: u64,
}

impl LogBuffer {
    pub fn new(name: &str, namespace: &str, capacity: usize) -> Self {
        Self {
            name: name.to_string(),
            namespace: namespace.to_string(),
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                lines: VecDeque::new(),
                next_seq: 1,
            }),
            live: std::sync::OnceLock::new(),
        }
    }

    pub fn push(&self, instance: &str, text: String) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let msg = LogMessage {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            instance: instance.to_string(),
            timestamp: Utc::now(),
            text,
            seq: inner.next_seq,
        };
        inner.next_seq += 1;
        if inner.lines.len() == self.capacity {
            inner.lines.pop_front();
        }
        inner.lines.push_back(msg.clone());
        // Sent under the lock so that subscribers see lines in sequence order.
        if let Some(live) = self.live.get() {
            let _ = live.send(msg);
        }
    }

    pub fn subscribe(&self, query: &LogQuery) -> LogSubscription {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let live = query.follow.then(|| {
            self.live
                .get_or_init(|| broadcast::channel(1024).0)
                .subscribe()
        });
        let mut history: Vec<LogMessage> = inner
            .lines
            .iter()
            .filter(|m| query.matches(m))
            .cloned()
            .collect();
        if let Some(tail) = query.tail {
            let skip = history.len().saturating_sub(tail);
            history.drain(..skip);
        }
        LogSubscription {
            history,
            live,
            last_seq: inner.next_seq - 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_tailed() {
        let buf = LogBuffer::new("f", "ns", 3);
        for i in 0..5 {
            buf.push(if i % 2 == 0 { "a" } else { "b" }, format!("line {i}"));
        }
        let all = buf.subscribe(&LogQuery::default());
        let texts: Vec<_> = all.history.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["line 2", "line 3", "line 4"]);
        let tail = buf.subscribe(&LogQuery {
            tail: Some(1),
            ..Default::default()
        });
        assert_eq!(tail.history[0].text, "line 4");
        let only_a = buf.subscribe(&LogQuery {
            instance: Some("a".into()),
            ..Default::default()
        });
        assert_eq!(only_a.history.len(), 2);
    }

    #[tokio::test]
    async fn follow_sees_new_lines_once() {
        let buf = LogBuffer::new("f", "ns", 10);
        buf.push("a", "old".into());
        let mut sub = buf.subscribe(&LogQuery {
            follow: true,
            ..Default::default()
        });
        buf.push("a", "new".into());
        let mut live = sub.live.take().unwrap();
        let msg = live.recv().await.unwrap();
        assert!(msg.seq > sub.last_seq);
        assert_eq!(msg.text, "new");
    }
}
