//! OpenAI wire types ctxgate reads and writes: the chat request parsed once ([`ChatRequest`]),
//! a message's role, text and tool calls, the answer assembled from a body or a stream, SSE
//! lines and events, and `usage`. No I/O here, and nothing of ctxgate's features.
//!
//! ctxgate forwards the client's bytes, never a re-serialisation of these types, so unknown
//! fields and key order survive untouched.

pub(crate) mod answer;
pub(crate) mod events;
pub(crate) mod message;
pub(crate) mod request;
pub(crate) mod sse;
pub(crate) mod usage;

pub use request::ChatRequest;
pub use request::ChatRequestHead;
pub use usage::{Usage, UsageObserver, UsageScanner};
