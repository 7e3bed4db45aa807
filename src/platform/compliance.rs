//! The adapter compliance suite: what every platform must do, checked the same way against
//! each (the fake, local processes, Docker, Swarm and a remote agent; see `tests/platforms.rs`).
//! A platform passes when each step below holds within the time it is given.

use std::time::Duration;

use super::{Platform, ReplicaCounts, Workload};
use crate::model::{FunctionDeployment, FunctionId};

/// How to run the suite against one platform.
pub struct Suite {
    /// A deployment this platform runs; its `service` and `namespace` are set by the suite.
    pub deployment: FunctionDeployment,
    /// How long replicas may take to become ready (or go) after a change.
    pub settle: Duration,
    /// Whether the endpoints answer HTTP (every real platform's do; the fake's do not).
    pub serves: bool,
}

/// Polls `check` every 50 ms until it holds or `within` passes.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fails with `what` and the counts the table shows.
fn fail(step: &str, what: &str, counts: ReplicaCounts) -> String {
    format!(
        "{step}: {what} (the table shows {} desired, {} ready)",
        counts.desired, counts.ready
    )
}

impl Suite {
    /// Runs every step on function `name` (in namespace `compliance`); the first failure is
    /// the error, naming its step.
    pub async fn run(&self, platform: &dyn Platform, name: &str) -> Result<(), String> {
        let id = FunctionId::new(name, "compliance");
        let table = platform.table();
        let workload = |image_tag: &str| {
            let mut deployment = self.deployment.clone();
            deployment.service = Some(name.to_string());
            deployment.namespace = Some("compliance".to_string());
            let mut labels = deployment.labels.take().unwrap_or_default();
            labels.insert("compliance-version".to_string(), image_tag.to_string());
            deployment.labels = Some(labels);
            Workload {
                id: id.clone(),
                deployment,
                secrets: vec![("token".to_string(), b"s3cret".to_vec())],
            }
        };
        let listed =
            |list: &[(FunctionId, u64)]| list.iter().find(|(f, _)| *f == id).map(|(_, n)| *n);
        let settles = |step: &'static str, desired: u64, ready: u64| {
            self.settles(platform, &id, step, ReplicaCounts { desired, ready })
        };

        platform
            .healthcheck()
            .await
            .map_err(|e| format!("healthcheck: {e}"))?;
        let list = platform.list().await.map_err(|e| format!("list: {e}"))?;
        if listed(&list).is_some() {
            return Err(format!("list: {id} is listed before it was applied"));
        }
        platform
            .remove(&id)
            .await
            .map_err(|e| format!("remove of a function it does not run: {e}"))?;
        if platform.scale(&id, 1).await.is_ok() {
            return Err("scale of a function it does not run: succeeded".to_string());
        }

        // Apply: two replicas, ready, serving, listed, gauged.
        let mut waiting = table.watch_ready(&id);
        platform
            .apply(workload("1"), 2)
            .await
            .map_err(|e| format!("apply: {e}"))?;
        settles("apply 2", 2, 2).await?;
        if !eventually(self.settle, || *waiting.borrow_and_update() == 2).await {
            return Err("apply 2: a watch begun before the apply never saw 2 ready".into());
        }
        let list = platform.list().await.map_err(|e| format!("list: {e}"))?;
        if listed(&list) != Some(2) {
            return Err(format!(
                "list after apply 2: {id} listed as {:?}",
                listed(&list)
            ));
        }
        let gauge = table
            .ready_gauge(&id)
            .ok_or("ready_gauge after apply: none")?;
        if gauge.ready() != Some(2) {
            return Err(format!("ready_gauge after apply 2: {:?}", gauge.ready()));
        }
        self.serve("apply 2", platform, &id).await?;

        // Scale down and up.
        platform
            .scale(&id, 1)
            .await
            .map_err(|e| format!("scale to 1: {e}"))?;
        settles("scale to 1", 1, 1).await?;
        platform
            .scale(&id, 3)
            .await
            .map_err(|e| format!("scale to 3: {e}"))?;
        settles("scale to 3", 3, 3).await?;
        self.serve("scale to 3", platform, &id).await?;

        // A new version: the function keeps serving while it rolls.
        platform
            .apply(workload("2"), 1)
            .await
            .map_err(|e| format!("apply of a new version: {e}"))?;
        let mut gap = false;
        let rolled = eventually(self.settle, || {
            let endpoints = table.endpoints(&id).map_or(0, |e| e.len());
            gap |= endpoints == 0;
            table.replicas(&id)
                == ReplicaCounts {
                    desired: 1,
                    ready: 1,
                }
        })
        .await;
        if !rolled {
            return Err(fail(
                "roll to a new version",
                "never settled at 1",
                table.replicas(&id),
            ));
        }
        if gap {
            return Err("roll to a new version: a moment without endpoints".into());
        }
        self.serve("after the roll", platform, &id).await?;

        // Zero: still listed, nothing to route to.
        platform
            .scale(&id, 0)
            .await
            .map_err(|e| format!("scale to 0: {e}"))?;
        settles("scale to 0", 0, 0).await?;
        if table.endpoints(&id).is_some_and(|e| !e.is_empty()) {
            return Err("scale to 0: endpoints left".into());
        }
        let list = platform.list().await.map_err(|e| format!("list: {e}"))?;
        if listed(&list) != Some(0) {
            return Err(format!("list at 0: {id} listed as {:?}", listed(&list)));
        }

        // Remove: gone from the list and the table; a gauge held from before says so.
        platform
            .scale(&id, 1)
            .await
            .map_err(|e| format!("scale to 1: {e}"))?;
        settles("scale back to 1", 1, 1).await?;
        platform
            .remove(&id)
            .await
            .map_err(|e| format!("remove: {e}"))?;
        if table.endpoints(&id).is_some_and(|e| !e.is_empty()) {
            return Err("remove: endpoints left once it returned".into());
        }
        if gauge.ready().is_some() {
            return Err(format!(
                "remove: a held gauge still reads {:?}",
                gauge.ready()
            ));
        }
        let list = platform.list().await.map_err(|e| format!("list: {e}"))?;
        if listed(&list).is_some() {
            return Err(format!("list after remove: {id} is still listed"));
        }
        platform
            .remove(&id)
            .await
            .map_err(|e| format!("remove again: {e}"))?;
        Ok(())
    }

    /// The table shows `want` within the settle time.
    async fn settles(
        &self,
        platform: &dyn Platform,
        id: &FunctionId,
        step: &str,
        want: ReplicaCounts,
    ) -> Result<(), String> {
        let table = platform.table();
        if eventually(self.settle, || table.replicas(id) == want).await {
            return Ok(());
        }
        let what = format!("expected {} desired and {} ready", want.desired, want.ready);
        Err(fail(step, &what, table.replicas(id)))
    }

    /// Every endpoint answers an invocation (when the platform serves).
    async fn serve(
        &self,
        step: &str,
        platform: &dyn Platform,
        id: &FunctionId,
    ) -> Result<(), String> {
        if !self.serves {
            return Ok(());
        }
        let endpoints = platform
            .table()
            .endpoints(id)
            .ok_or(format!("{step}: no endpoints"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        for e in endpoints.iter() {
            let mut request = http
                .post(format!("http://{}{}/", e.addr, e.path_prefix))
                .body("ping");
            if let Some(token) = &e.agent_token {
                request = request.header("x-faastastic-agent-token", token.clone());
            }
            let answer = request
                .send()
                .await
                .map_err(|err| format!("{step}: endpoint {} does not answer: {err}", e.instance))?;
            if !answer.status().is_success() {
                return Err(format!(
                    "{step}: endpoint {} answered {}",
                    e.instance,
                    answer.status()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::fake::FakePlatform;

    #[tokio::test]
    async fn the_fake_platform_passes() {
        let suite = Suite {
            deployment: FunctionDeployment {
                image: Some("any".into()),
                ..Default::default()
            },
            settle: Duration::from_secs(2),
            serves: false,
        };
        suite.run(&*FakePlatform::new(), "fake").await.unwrap();
    }

    /// The suite fails a platform whose replicas never become ready, naming the step.
    #[tokio::test]
    async fn a_platform_that_never_readies_fails_at_apply() {
        let fake = FakePlatform::new();
        fake.never_ready
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let suite = Suite {
            deployment: FunctionDeployment::default(),
            settle: Duration::from_millis(300),
            serves: false,
        };
        let e = suite.run(&*fake, "late").await.unwrap_err();
        assert!(e.starts_with("apply 2:"), "{e}");
    }
}
