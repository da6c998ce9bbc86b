//! OpenAI wire types ctxgate reads: just enough of a chat request to validate and route it, and
//! the `usage` object of responses and stream chunks. No I/O here.
//!
//! ctxgate forwards the client's bytes, never a re-serialisation of these types, so unknown
//! fields and key order survive untouched.

pub(crate) mod answer;
pub(crate) mod events;
pub(crate) mod message;
pub(crate) mod request;
pub(crate) mod sse;
mod usage;

pub use request::ChatRequest;
pub use request::ChatRequestHead;
pub use usage::{Usage, UsageObserver, UsageScanner};
