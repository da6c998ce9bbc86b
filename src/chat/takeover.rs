//! The takeover sweep: turns whose owner died are re-issued without waiting for a request.
//!
//! It reads the store's in-flight index, which holds the turns any process may re-issue (those
//! whose upstream needs no credential of the caller's, as none is ever stored). On the embedded
//! store the sweep runs once, at start-up: the file is locked to this process, so every turn
//! marked in flight then belongs to a dead predecessor, whatever its lease says. On Redis it
//! runs every quarter lease, for the replicas that die while this one runs. Turns that need the
//! caller's credential are taken over by the first follower, resume call or request instead.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use tokio_util::sync::CancellationToken;

use super::resume;
use crate::session::checkpoint::now_ms;
use crate::AppState;

/// How many lapsed turns one pass of the Redis sweep looks at.
const BATCH: usize = 256;

/// Sweeps until `stop` (the embedded store: once).
pub(crate) async fn sweep(app: Arc<AppState>, stop: CancellationToken) {
    let sessions = &app.sessions;
    if !sessions.shared() {
        sweep_once(&app, usize::MAX).await;
        return;
    }
    let period = (sessions.config.lease / 4).max(Duration::from_millis(100));
    loop {
        sweep_once(&app, BATCH).await;
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Takes over each lapsed turn of the index (the first process to try wins each) and drops
/// entries of sessions no longer in flight.
async fn sweep_once(app: &Arc<AppState>, limit: usize) {
    let sessions = &app.sessions;
    let keys = match sessions.lapsed_turns(limit).await {
        Ok(keys) => keys,
        Err(err) => {
            tracing::warn!(error = %err, "takeover sweep: cannot read the in-flight index");
            return;
        }
    };
    for key in keys {
        let stored = match sessions.load(&key).await {
            Ok(stored) => stored,
            Err(err) => {
                tracing::warn!(session = ?key, error = %err, "takeover sweep: cannot load a session");
                continue;
            }
        };
        let in_flight = stored.as_ref().and_then(|s| s.checkpoint.in_flight.as_ref());
        match in_flight {
            Some(f) if f.request.as_ref().is_some_and(|r| !r.caller_credential) => {
                // A live owner (a renewal the index has not seen yet) keeps its turn.
                if sessions.lapsed(f, now_ms()) {
                    if let Some(stored) = stored {
                        if let Err(err) = resume(app, key.clone(), HeaderMap::new(), stored).await {
                            tracing::warn!(session = ?key, error = %err, "takeover sweep: cannot take a turn over");
                        }
                    }
                }
            }
            _ => {
                if let Err(err) = sessions.unindex(&key).await {
                    tracing::warn!(session = ?key, error = %err, "takeover sweep: cannot drop an index entry");
                }
            }
        }
    }
}
