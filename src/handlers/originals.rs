//! `GET /v1/ctxgate/originals/{id}`: the original message a marker names, byte for byte as the
//! client sent it, for the caller that sent it (`message`; for a dropped run's id, `messages`,
//! in order). With the session header the session's
//! transcript is searched; without it, the caller's store of originals (kept by stateless
//! epochs for the compression state's lifetime).

use std::sync::Arc;

use http::{Request, Response};
use serde_json::value::RawValue;

use crate::auth::scope_credential;
use crate::body::Body;
use crate::chat::compression::stored_original;
use crate::compress::{expand, marker};
use crate::error::GatewayError;
use crate::http_util::json_response;
use crate::session::SessionKey;
use crate::AppState;

pub(crate) async fn original(
    app: Arc<AppState>,
    request: Request<Body>,
) -> Result<Response<Body>, GatewayError> {
    let (parts, _body) = request.into_parts();
    let id = parts.uri.path().trim_start_matches("/v1/ctxgate/originals/");
    let missing = || GatewayError::OriginalNotFound { id: id.to_string() };
    if !is_id(id) {
        return Err(missing());
    }
    let credential = scope_credential(&parts.headers, &parts.extensions);
    let session = app.sessions.identify(&parts.headers, None, !credential.is_empty())?;
    let found: Option<Vec<Box<RawValue>>> = match session {
        Some(session) => {
            let stored = app.sessions.load(&SessionKey::new(&credential, &session.id)).await?;
            stored.and_then(|s| {
                let transcript = &s.checkpoint.transcript;
                match id.contains(marker::RUN) {
                    true => expand::run(transcript, id).map(<[_]>::to_vec),
                    false => expand::resolve(transcript, id).map(|m| vec![m]),
                }
            })
        }
        None => stored_original(&app, &SessionKey::new(&credential, "").scope, id).await,
    };
    let messages = found.ok_or_else(missing)?;
    // Serialized around the raw messages: `json!` would re-encode them (key order, spacing).
    #[derive(serde::Serialize)]
    struct Original<'a> {
        id: &'a str,
        object: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        messages: Option<&'a [Box<RawValue>]>,
    }
    let run = id.contains(marker::RUN);
    Ok(json_response(&Original {
        id,
        object: "ctxgate.original",
        message: messages.first().map(|m| &**m).filter(|_| !run),
        messages: run.then_some(&messages[..]),
    }))
}

/// A message id (10 hex digits) or a run's (two joined by `..`).
fn is_id(id: &str) -> bool {
    let hex = |s: &str| s.len() == 10 && s.bytes().all(|b| b.is_ascii_hexdigit());
    match id.split_once(marker::RUN) {
        Some((first, last)) => hex(first) && hex(last),
        None => hex(id),
    }
}
