//! The handlers besides chat: the model list and every other `/v1/*` route passed through
//! ([`passthrough`]), the sessions API ([`sessions`]), and the originals compression elided
//! ([`originals`]).

pub(crate) mod originals;
pub(crate) mod passthrough;
pub(crate) mod sessions;
