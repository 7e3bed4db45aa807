//! On a shared store, this instance follows what the others change: each announced change is
//! read again where it lives (the fleet's functions and namespaces, the engine's states and
//! pauses), and everything is read again after a gap in the announcements and every
//! `RESYNC` as a safety net.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;

use super::executor::Autoscaler;
use crate::fleet::Fleet;
use crate::model::FunctionId;
use crate::store::{Change, Note, Store};

/// How often everything is read again whatever was announced.
pub const RESYNC: Duration = Duration::from_secs(10);

/// Starts following a shared store's changes; nothing to follow on a store of one's own.
pub fn spawn(store: &Store, fleet: Arc<Fleet>, autoscaler: Arc<Autoscaler>) {
    let Some(mut notes) = store.subscribe() else {
        return;
    };
    tokio::spawn(async move {
        let mut resync = tokio::time::interval(RESYNC);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let note = tokio::select! {
                note = notes.recv() => match note {
                    Ok(note) => note,
                    Err(RecvError::Lagged(_)) => Note::Resync,
                    Err(RecvError::Closed) => return,
                },
                _ = resync.tick() => Note::Resync,
            };
            if let Err(e) = follow(&note, &fleet, &autoscaler).await {
                tracing::warn!(error = %e, "cannot read another instance's change; reading everything again in {RESYNC:?}");
            }
        }
    });
}

async fn follow(note: &Note, fleet: &Fleet, autoscaler: &Autoscaler) -> anyhow::Result<()> {
    match note {
        Note::Resync => {
            fleet.resync().await?;
            autoscaler.refresh_states(None).await?;
            autoscaler.reload_pauses().await?;
        }
        Note::Changed {
            kind,
            namespace,
            name,
        } => {
            let id = FunctionId::new(name.clone(), namespace.clone());
            match kind {
                Change::Function => fleet.refresh(&id).await?,
                Change::State => autoscaler.refresh_states(Some(&id)).await?,
                Change::Pause => autoscaler.reload_pauses().await?,
                Change::Namespace => fleet.reload_namespaces().await?,
                // Read from the store whenever a function is deployed.
                Change::Secret => {}
            }
        }
    }
    Ok(())
}
