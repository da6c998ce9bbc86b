//! Stored responses: each kept beside the sessions (a [`BlobKind::Response`] blob, so in the
//! embedded store or Redis, expiring with the session TTL), keyed by the caller's scope and
//! the response id, so another caller's id is not found.
//!
//! A record holds the Response object, this request's input items as listed, and its part of
//! the conversation as Responses items (its input and its output; `instructions` are not part
//! of it, as OpenAI does not carry them over), with the response it continues. The
//! conversation through a response is its chain's parts in order: every [`SNAPSHOT_EVERY`]th
//! response of a chain holds the whole conversation instead (and so does one whose chain rests
//! on a whole record written over half the TTL ago, so no part a chain needs expires before its
//! newest response), so rebuilding one reads at most that many records, and a chain of `n`
//! turns stores `n²/SNAPSHOT_EVERY` items rather than `n²`. Items are kept as the client and the upstream sent them, so a chain can move between a
//! chat upstream (they are translated each time) and a Responses one (sent as kept).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::GatewayError;
use crate::session::checkpoint::now_ms;
use crate::session::{blob_log, BlobKind, SessionKey, Sessions};

/// How often a chain's record holds its whole conversation.
const SNAPSHOT_EVERY: u32 = 16;

const VERSION: u32 = 1;

/// One stored response. Versioned; fields added later must default.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Record {
    pub(crate) version: u32,
    pub(crate) response: Value,
    pub(crate) input_items: Vec<Value>,
    /// This response's part of the conversation (its input, then its output), or the whole
    /// conversation through it when `whole`.
    items: Vec<Value>,
    whole: bool,
    /// The response this one continues.
    previous: Option<String>,
    /// Its place in the chain (the first response is 0).
    depth: u32,
    /// When it was written (ms since the epoch).
    written_ms: u64,
    /// The session id the chain's turns run on.
    pub(crate) session: Option<String>,
    /// Deleted (`DELETE /v1/responses/{id}`): no longer listed or read, but the chain's later
    /// responses still continue through its part until the TTL removes it.
    deleted: bool,
    /// A background response still running: the process running it (`Sessions::owner`).
    pub(crate) owner: Option<String>,
    /// A background response created with `stream`: its events are logged for replay.
    pub(crate) streamed: bool,
    /// A cancel asked for on a replica that does not run the response; its owner reads it.
    pub(crate) cancel_requested: bool,
}

impl Record {
    /// Whether the response is still queued or in progress.
    pub(crate) fn running(&self) -> bool {
        super::response::Status::running(self.response["status"].as_str().unwrap_or(""))
    }

    pub(crate) fn background(&self) -> bool {
        self.response["background"].as_bool() == Some(true)
    }
}

/// The conversation through a stored response: what a response continuing it is sent.
#[derive(Debug, Default)]
pub(crate) struct Chain {
    /// The response's id.
    pub(crate) id: String,
    pub(crate) items: Vec<Value>,
    pub(crate) depth: u32,
    pub(crate) session: Option<String>,
    /// When the whole record the conversation was rebuilt from was written.
    whole_written_ms: u64,
}

/// A response to store.
pub(crate) struct New<'a> {
    pub(crate) id: &'a str,
    pub(crate) response: Value,
    pub(crate) input_items: Vec<Value>,
    /// The chain it continues.
    pub(crate) previous: Option<&'a Chain>,
    /// Its input and output items.
    pub(crate) items: Vec<Value>,
    pub(crate) session: Option<String>,
    /// A background response created with `stream`.
    pub(crate) streamed: bool,
}

/// A caller's scope as stored responses are keyed by: the [`SessionKey`] scope of its
/// credential (so a chain's session and its responses share it).
pub(crate) fn scope_of(credential: &[u8]) -> String {
    SessionKey::new(credential, "").scope
}

fn key(scope: &str, id: &str) -> String {
    SessionKey { scope: scope.to_string(), id: id.to_string() }.storage_key()
}

/// Where a background response's stream events are logged (beside its record, expiring with
/// it).
pub(crate) fn log_key(scope: &str, id: &str) -> SessionKey {
    blob_log(BlobKind::Response, &SessionKey { scope: scope.to_string(), id: id.to_string() })
}

async fn read(sessions: &Sessions, scope: &str, id: &str) -> Result<Option<Record>, GatewayError> {
    let Some(bytes) = sessions.get_blob(BlobKind::Response, &key(scope, id)).await? else { return Ok(None) };
    let record = serde_json::from_slice(&bytes).map_err(|e| GatewayError::Internal(e.into()))?;
    Ok(Some(record))
}

async fn write(sessions: &Sessions, scope: &str, id: &str, mut record: Record) -> Result<(), GatewayError> {
    record.version = VERSION;
    let bytes = serde_json::to_vec(&record).map_err(|e| GatewayError::Internal(e.into()))?;
    sessions.put_blob(BlobKind::Response, &key(scope, id), Bytes::from(bytes)).await?;
    Ok(())
}

/// The caller's record `id`, if it is stored and not deleted.
pub(crate) async fn load(sessions: &Sessions, scope: &str, id: &str) -> Result<Option<Record>, GatewayError> {
    Ok(read(sessions, scope, id).await?.filter(|record| !record.deleted))
}

/// The conversation through the caller's response `id`; `None` when it is not stored (or
/// deleted), or when a part of its chain has expired.
pub(crate) async fn chain(sessions: &Sessions, scope: &str, id: &str) -> Result<Option<Chain>, GatewayError> {
    let Some(record) = load(sessions, scope, id).await? else { return Ok(None) };
    if record.running() {
        return Err(GatewayError::invalid(
            format!("Previous response with id '{id}' is still in progress."),
            Some("previous_response_id"),
            "previous_response_not_finished",
        ));
    }
    let (depth, session) = (record.depth, record.session.clone());
    let mut parts = vec![record.items];
    let (mut whole, mut previous, mut written_ms) = (record.whole, record.previous, record.written_ms);
    while !whole {
        let Some(earlier) = previous else { break };
        let Some(record) = read(sessions, scope, &earlier).await? else { return Ok(None) };
        parts.push(record.items);
        (whole, previous, written_ms) = (record.whole, record.previous, record.written_ms);
    }
    let items = parts.into_iter().rev().flatten().collect();
    Ok(Some(Chain { id: id.to_string(), items, depth, session, whole_written_ms: written_ms }))
}

/// Stores a response: its part of the conversation, or on every [`SNAPSHOT_EVERY`]th response
/// of a chain the whole of it.
pub(crate) async fn save(sessions: &Sessions, scope: &str, new: New<'_>) -> Result<(), GatewayError> {
    let depth = new.previous.map_or(0, |p| p.depth + 1);
    let now = now_ms();
    let half_ttl = (sessions.config.ttl.as_millis() / 2) as u64;
    let whole = depth.is_multiple_of(SNAPSHOT_EVERY)
        || new.previous.is_some_and(|p| now.saturating_sub(p.whole_written_ms) > half_ttl);
    let items = match new.previous {
        Some(previous) if whole => previous.items.iter().cloned().chain(new.items).collect(),
        _ => new.items,
    };
    let record = Record {
        response: new.response,
        input_items: new.input_items,
        items,
        whole,
        previous: new.previous.map(|p| p.id.clone()),
        depth,
        written_ms: now,
        session: new.session,
        streamed: new.streamed,
        ..Record::default()
    };
    write(sessions, scope, new.id, record).await
}

/// Stores a background response as it starts (`queued`), owned by this process: its input is
/// its part of the conversation until [`save`] stores it finished. A chain cannot continue
/// from it meanwhile.
pub(crate) async fn save_running(sessions: &Sessions, scope: &str, new: New<'_>) -> Result<(), GatewayError> {
    let record = Record {
        response: new.response,
        input_items: new.input_items,
        items: new.items,
        previous: new.previous.map(|p| p.id.clone()),
        depth: new.previous.map_or(0, |p| p.depth + 1),
        written_ms: now_ms(),
        session: new.session,
        owner: Some(sessions.owner.clone()),
        streamed: new.streamed,
        ..Record::default()
    };
    write(sessions, scope, new.id, record).await
}

/// Rewrites the caller's record `id` with `change` (read, then written: a concurrent writer
/// may win, which callers allow for); `None` when there is none.
pub(crate) async fn update(
    sessions: &Sessions,
    scope: &str,
    id: &str,
    change: impl FnOnce(&mut Record),
) -> Result<Option<Record>, GatewayError> {
    let Some(mut record) = load(sessions, scope, id).await? else { return Ok(None) };
    change(&mut record);
    let bytes = serde_json::to_vec(&record).map_err(|e| GatewayError::Internal(e.into()))?;
    sessions.put_blob(BlobKind::Response, &key(scope, id), Bytes::from(bytes)).await?;
    Ok(Some(record))
}

impl Record {
    /// A running record's own input, and the id of the response it continues.
    pub(crate) fn pending_parts(&self) -> (Vec<Value>, Option<String>) {
        (self.items.clone(), self.previous.clone())
    }

    /// When it was last written (ms since the epoch).
    pub(crate) fn written_ms(&self) -> u64 {
        self.written_ms
    }
}

/// Deletes the caller's response `id`; false when there was none. Its object and input items
/// are dropped at once; its part of the conversation stays (the blob stores have no delete,
/// and later responses of its chain continue through it) until the TTL removes it.
pub(crate) async fn delete(sessions: &Sessions, scope: &str, id: &str) -> Result<bool, GatewayError> {
    let Some(record) = load(sessions, scope, id).await? else { return Ok(false) };
    let tombstone = Record { response: Value::Null, input_items: Vec::new(), deleted: true, ..record };
    write(sessions, scope, id, tombstone).await?;
    Ok(true)
}
