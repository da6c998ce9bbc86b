//! `GET /v1/ctxgate/originals/{id}`: the original message a marker names, byte for byte as the
//! client sent it, for the caller that sent it. With the session header the session's
//! transcript is searched; without it, the caller's store of originals (kept by stateless
//! epochs for the compression state's lifetime).

use std::sync::Arc;

use http::{Request, Response};
use serde_json::value::RawValue;

use crate::auth::scope_credential;
use crate::body::Body;
use crate::chat::compression::original_key;
use crate::compress::expand;
use crate::error::GatewayError;
use crate::http_util::json_response;
use crate::session::{BlobKind, SessionKey};
use crate::AppState;

pub(crate) async fn original(
    app: Arc<AppState>,
    request: Request<Body>,
) -> Result<Response<Body>, GatewayError> {
    let (parts, _body) = request.into_parts();
    let id = parts.uri.path().trim_start_matches("/v1/ctxgate/originals/");
    let missing = || GatewayError::OriginalNotFound { id: id.to_string() };
    if id.len() != 10 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(missing());
    }
    let credential = scope_credential(&parts.headers, &parts.extensions);
    let found: Option<Box<RawValue>> = match app.sessions.id_of(&parts.headers)? {
        Some(session) => {
            let stored = app.sessions.load(&SessionKey::new(&credential, &session)).await?;
            stored.and_then(|s| expand::resolve(&s.checkpoint.transcript, id))
        }
        None => {
            let scope = SessionKey::new(&credential, "").scope;
            let bytes = app.sessions.get_blob(BlobKind::Original, &original_key(&scope, id)).await?;
            bytes.and_then(|b| String::from_utf8(b.to_vec()).ok()).and_then(|t| RawValue::from_string(t).ok())
        }
    };
    let message = found.ok_or_else(missing)?;
    // Serialized around the raw message: `json!` would re-encode it (key order, spacing).
    #[derive(serde::Serialize)]
    struct Original<'a> {
        id: &'a str,
        object: &'static str,
        message: &'a RawValue,
    }
    Ok(json_response(&Original { id, object: "ctxgate.original", message: &message }))
}
