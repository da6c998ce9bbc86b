//! [`TimedStore`]: the decorator every store sits behind. Each operation's latency goes to
//! `ctxgate_session_store_duration_seconds{op}` and each failure to
//! `ctxgate_session_store_errors_total`, so no call site can skip the instrumentation.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::checkpoint::Encoded;
use super::store::{BoxFuture, Commit, SessionKey, SessionStore, StoreError, Stored};
use crate::telemetry::{Metrics, OpLabel};

#[derive(Debug)]
pub(super) struct TimedStore {
    inner: Arc<dyn SessionStore>,
    metrics: Arc<Metrics>,
}

impl TimedStore {
    pub(super) fn new(inner: Arc<dyn SessionStore>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    fn timed<'a, T: 'a>(
        &'a self,
        op: &'static str,
        future: impl Future<Output = Result<T, StoreError>> + Send + 'a,
    ) -> BoxFuture<'a, Result<T, StoreError>> {
        Box::pin(async move {
            let started = Instant::now();
            let result = future.await;
            let duration = self.metrics.session_store_duration.get_or_create(&OpLabel { op }).clone();
            duration.observe(started.elapsed().as_secs_f64());
            if result.is_err() {
                self.metrics.session_store_errors.inc();
            }
            result
        })
    }
}

impl SessionStore for TimedStore {
    fn load<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        self.timed("load", self.inner.load(key))
    }

    fn commit<'a>(
        &'a self,
        key: &'a SessionKey,
        expected: u64,
        checkpoint: &'a Encoded,
    ) -> BoxFuture<'a, Result<Commit, StoreError>> {
        self.timed("commit", self.inner.commit(key, expected, checkpoint))
    }

    fn delete<'a>(&'a self, key: &'a SessionKey) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.timed("delete", self.inner.delete(key))
    }

    fn append_events<'a>(
        &'a self,
        key: &'a SessionKey,
        turn: u64,
        first_seq: u64,
        events: &'a [Bytes],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.timed("append_events", self.inner.append_events(key, turn, first_seq, events))
    }

    fn read_events<'a>(
        &'a self,
        key: &'a SessionKey,
        turn: u64,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(u64, Bytes)>, StoreError>> {
        self.timed("read_events", self.inner.read_events(key, turn, after_seq, limit))
    }

    fn get_blob<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        self.timed("get_blob", self.inner.get_blob(key))
    }

    fn put_blob<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        self.timed("put_blob", self.inner.put_blob(key, value))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.timed("ping", self.inner.ping())
    }
}
