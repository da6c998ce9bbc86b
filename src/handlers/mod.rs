//! The handlers besides chat: the model list and every other `/v1/*` route passed through
//! ([`passthrough`]), and the sessions API ([`sessions`]).

pub(crate) mod passthrough;
pub(crate) mod sessions;
