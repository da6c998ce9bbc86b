//! Per-event cost ctxgate adds to a streamed response: the work between an upstream frame
//! arriving and it being handed to the client connection.
//!
//! `sse_passthrough` runs a realistic streamed chat completion (256 `chat.completion.chunk`
//! events, a usage chunk, `data: [DONE]`) through [`UsageScanner::observe`], with one event per
//! frame and with the bytes re-split at 1460-byte (TCP segment) boundaries so lines straddle
//! frames. Two chunk shapes are measured: OpenAI's with `stream_options.include_usage`, where
//! every chunk carries `"usage":null` and so mentions the needle, and chunks without a `usage`
//! key. Then the same frames flow through a boxed body, through [`Tracked`] (the wrapper the
//! metrics and concurrency layers put around every response), and through `Tracked` with the
//! scanner observing each frame, as a response does on its way out. Throughput is in events: the
//! time per event is what each token costs on top of the upstream.
//!
//! `json_usage` scans a ~2 KiB non-streamed completion for its `usage`, arriving in 1 and in 4
//! frames (the multi-frame case concatenates before parsing).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ctxgate::body::BoxError;
use ctxgate::body::{Body, Tracked};
use ctxgate::openai::{Usage, UsageScanner};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

const CHUNKS: usize = 256;
const USAGE: &str = r#"{"prompt_tokens":18734,"completion_tokens":256,"total_tokens":18990,"prompt_tokens_details":{"cached_tokens":17920,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#;
const TOKENS: [&str; 8] = [" the", " limiter", "'s", " window", " is", " computed", " correctly", ".\\n"];

/// The events of one streamed completion, one `Bytes` per event; `usage_null` adds
/// `"usage":null` to every chunk as OpenAI does when `include_usage` is set.
fn sse_events(usage_null: bool) -> Vec<Bytes> {
    let head = r#"data: {"id":"chatcmpl-AB1cDeFgHiJkLmNoPqRsTuVwXyZ01","object":"chat.completion.chunk","created":1727172902,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_e375328146","choices":["#;
    let tail = if usage_null { "],\"usage\":null}\n\n" } else { "]}\n\n" };
    let mut events = Vec::with_capacity(CHUNKS + 2);
    events.push(Bytes::from(format!(
        r#"{head}{{"index":0,"delta":{{"role":"assistant","content":"","refusal":null}},"logprobs":null,"finish_reason":null}}{tail}"#
    )));
    for i in 1..CHUNKS - 1 {
        let token = TOKENS[i % TOKENS.len()];
        events.push(Bytes::from(format!(
            r#"{head}{{"index":0,"delta":{{"content":"{token}"}},"logprobs":null,"finish_reason":null}}{tail}"#
        )));
    }
    events.push(Bytes::from(format!(
        r#"{head}{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}{tail}"#
    )));
    events.push(Bytes::from(format!("{head}],\"usage\":{USAGE}}}\n\n")));
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

/// The same bytes cut at `size`-byte boundaries, regardless of event boundaries.
fn resplit(events: &[Bytes], size: usize) -> Vec<Bytes> {
    let all = Bytes::from(events.concat());
    (0..all.len()).step_by(size).map(|at| all.slice(at..(at + size).min(all.len()))).collect()
}

fn expected_usage() -> Usage {
    serde_json::from_str(USAGE).unwrap()
}

fn scan(content_type: &str, frames: &[Bytes]) -> Option<Usage> {
    let mut scanner = UsageScanner::for_response(Some(content_type), false);
    for frame in frames {
        scanner.observe(frame);
    }
    scanner.finish()
}

/// A body yielding `frames` as data frames, boxed like every body inside ctxgate.
fn body_of(frames: &[Bytes]) -> Body {
    let frames: Vec<Result<Frame<Bytes>, BoxError>> =
        frames.iter().map(|b| Ok(Frame::data(b.clone()))).collect();
    StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
}

/// Polls `body` to its end as the server connection would, handing each data frame to `each`.
async fn drain(mut body: Body, mut each: impl FnMut(&Bytes)) -> usize {
    let mut frames = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.unwrap().data_ref() {
            each(data);
            frames += 1;
        }
    }
    frames
}

fn sse_passthrough(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut group = c.benchmark_group("sse_passthrough");

    for (shape, usage_null) in [("usage_null", true), ("no_usage_key", false)] {
        let events = sse_events(usage_null);
        group.throughput(Throughput::Elements(events.len() as u64));
        for (framing, frames) in [("frame_per_event", events.clone()), ("split_1460", resplit(&events, 1460))]
        {
            assert_eq!(scan("text/event-stream", &frames), Some(expected_usage()));
            let id = BenchmarkId::new(format!("scanner_{shape}"), framing);
            group.bench_with_input(id, &frames, |b, frames| {
                b.iter(|| scan("text/event-stream", black_box(frames)))
            });
        }
    }

    // The body machinery, on OpenAI's chunk shape, one event per frame.
    let events = sse_events(true);
    group.throughput(Throughput::Elements(events.len() as u64));
    let count = runtime.block_on(drain(body_of(&events), |_| {}));
    assert_eq!(count, events.len());

    group.bench_function(BenchmarkId::new("body", "boxed"), |b| {
        b.iter_batched(
            || body_of(&events),
            |body| {
                runtime.block_on(drain(body, |data| {
                    let _ = black_box(data);
                }))
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function(BenchmarkId::new("body", "tracked"), |b| {
        b.iter_batched(
            || body_of(&events),
            |body| {
                let body = Tracked::new(body, Instant::now(), |end| {
                    let _ = black_box(end);
                })
                .boxed_unsync();
                runtime.block_on(drain(body, |data| {
                    let _ = black_box(data);
                }))
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function(BenchmarkId::new("body", "tracked_scanned"), |b| {
        b.iter_batched(
            || body_of(&events),
            |body| {
                let body = Tracked::new(body, Instant::now(), |end| {
                    let _ = black_box(end);
                })
                .boxed_unsync();
                let mut scanner = UsageScanner::for_response(Some("text/event-stream"), false);
                runtime.block_on(drain(body, |data| scanner.observe(data)));
                scanner.finish()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// A non-streamed chat completion of about 2 KiB.
fn json_completion() -> Bytes {
    let content = "The limiter's window is computed correctly: `Instant` is monotonic, so the cutoff \
                   never moves backwards. The real problem is that entries are only evicted on \
                   admission, so after raising `limit` at runtime the deque keeps growing.\\n\\n";
    let content = content.repeat(6);
    Bytes::from(format!(
        r#"{{"id":"chatcmpl-AB1cDeFgHiJkLmNoPqRsTuVwXyZ01","object":"chat.completion","created":1727172902,"model":"gpt-4o-2024-08-06","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}","refusal":null}},"logprobs":null,"finish_reason":"stop"}}],"usage":{USAGE},"system_fingerprint":"fp_e375328146"}}"#
    ))
}

fn json_usage(c: &mut Criterion) {
    let body = json_completion();
    let mut group = c.benchmark_group("json_usage");
    group.throughput(Throughput::Bytes(body.len() as u64));
    let quarter = body.len().div_ceil(4);
    for (label, frames) in
        [("1_frame", vec![body.clone()]), ("4_frames", resplit(std::slice::from_ref(&body), quarter))]
    {
        assert_eq!(scan("application/json", &frames), Some(expected_usage()));
        group.bench_with_input(BenchmarkId::new("scanner", label), &frames, |b, frames| {
            b.iter(|| scan("application/json", black_box(frames)))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = sse_passthrough, json_usage
}
criterion_main!(benches);
