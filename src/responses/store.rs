//! Stored responses: each kept beside the sessions (a [`BlobKind::Response`] blob, so in the
//! embedded store or Redis, expiring with the session TTL), keyed by the caller's scope and
//! the response id, so another caller's id is not found.
//!
//! A record holds the Response object, this request's input items as listed, the conversation
//! up to and including its answer as Responses items (what a `previous_response_id` continues
//! from, without the `instructions`, which OpenAI does not carry over), and the session its
//! chain runs on. Items are kept as the client and the upstream sent them, so a chain can move
//! between a chat upstream (they are translated each time) and a Responses one (sent as kept).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::GatewayError;
use crate::session::{BlobKind, SessionKey, Sessions};

/// One stored response. Versioned; fields added later must default.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Record {
    pub(crate) version: u32,
    pub(crate) response: Value,
    pub(crate) input_items: Vec<Value>,
    /// The conversation through this response's output, as Responses items.
    pub(crate) items: Vec<Value>,
    /// The session id the chain's turns run on.
    pub(crate) session: Option<String>,
    /// Deleted (`DELETE /v1/responses/{id}`): a tombstone until it expires.
    pub(crate) deleted: bool,
}

const VERSION: u32 = 1;

fn key(scope: &[u8], id: &str) -> String {
    SessionKey::new(scope, id).storage_key()
}

/// The caller's record `id`, if it is stored and not deleted.
pub(crate) async fn load(
    sessions: &Sessions,
    scope: &[u8],
    id: &str,
) -> Result<Option<Record>, GatewayError> {
    let Some(bytes) = sessions.get_blob(BlobKind::Response, &key(scope, id)).await? else { return Ok(None) };
    let record: Record = serde_json::from_slice(&bytes).map_err(|e| GatewayError::Internal(e.into()))?;
    Ok((!record.deleted).then_some(record))
}

pub(crate) async fn save(
    sessions: &Sessions,
    scope: &[u8],
    id: &str,
    mut record: Record,
) -> Result<(), GatewayError> {
    record.version = VERSION;
    let bytes = serde_json::to_vec(&record).map_err(|e| GatewayError::Internal(e.into()))?;
    sessions.put_blob(BlobKind::Response, &key(scope, id), Bytes::from(bytes)).await?;
    Ok(())
}

/// Deletes the caller's record `id`; false when there was none. The blob stores have no delete:
/// a tombstone replaces the record until the TTL removes it.
pub(crate) async fn delete(sessions: &Sessions, scope: &[u8], id: &str) -> Result<bool, GatewayError> {
    if load(sessions, scope, id).await?.is_none() {
        return Ok(false);
    }
    save(sessions, scope, id, Record { deleted: true, ..Record::default() }).await?;
    Ok(true)
}
