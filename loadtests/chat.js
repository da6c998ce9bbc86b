// k6 load test for POST {BASE_URL}/chat/completions — an OpenAI-compatible endpoint, either
// ctxgate or the mock upstream directly (run.sh runs both back to back and compares them).
//
// Environment:
//   BASE_URL   target base URL, e.g. http://127.0.0.1:8080/v1 (required)
//   MODE       json (default) | stream  — stream sends stream:true + stream_options.include_usage
//   MAX        1 = max-throughput mode: VUS virtual users in a closed loop (constant-vus) for
//              DURATION; otherwise open model: RATE req/s with the constant-arrival-rate executor
//   RATE       requests per second in rate mode (default 100)
//   DURATION   test length (default 20s)
//   VUS        preallocated VUs in rate mode (default max(10, RATE/10)), VU count in MAX mode
//              (default 64)
//   MAX_VUS    cap on VUs the arrival-rate executor may add when responses slow (default 4*VUS)
//   P99_MS     http_req_duration p99 threshold in ms (default 250 in rate mode, 2000 in MAX mode)
//   TTFB_P99_MS  stream mode: ttfb p99 threshold in ms (default P99_MS)
//   SUMMARY    path to write the full k6 summary JSON (default: none; text goes to stdout)
//   MODEL      the request's model (default mock-model); ctxgate routes by it
//   PREFIXES   distinct conversations (system prompts) spread over the requests (default 1),
//              so a pool with affinity sees many prefixes rather than one
//
// Thresholds (a breach makes k6 exit 99): http_req_failed < 1%, checks > 99%, p99 < P99_MS, and
// for streams ttfb p99 < TTFB_P99_MS.
import http from 'k6/http';
import { check } from 'k6';
import { Trend } from 'k6/metrics';
import { summaryOutput } from './scenarios/lib.js';

const BASE_URL = (__ENV.BASE_URL || '').replace(/\/+$/, '');
if (!BASE_URL) {
  throw new Error('BASE_URL is required, e.g. BASE_URL=http://127.0.0.1:8080/v1');
}
const MODE = (__ENV.MODE || 'json').toLowerCase();
if (MODE !== 'json' && MODE !== 'stream') {
  throw new Error(`MODE must be json or stream, not ${MODE}`);
}
const STREAM = MODE === 'stream';
const MAX = __ENV.MAX === '1' || (__ENV.MAX || '').toLowerCase() === 'true';
const RATE = parseInt(__ENV.RATE || '100', 10);
const DURATION = __ENV.DURATION || '20s';
const VUS = parseInt(__ENV.VUS || String(MAX ? 64 : Math.max(10, Math.ceil(RATE / 10))), 10);
const MAX_VUS = parseInt(__ENV.MAX_VUS || String(VUS * 4), 10);
const P99_MS = parseFloat(__ENV.P99_MS || (MAX ? '2000' : '250'));
const TTFB_P99_MS = parseFloat(__ENV.TTFB_P99_MS || String(P99_MS));
const SUMMARY = __ENV.SUMMARY || '';

// Time to first byte: request sent → first response byte (headers). For a stream this is what a
// chat UI waits for before anything can render.
const ttfb = new Trend('ttfb', true);

const scenario = MAX
  ? { executor: 'constant-vus', vus: VUS, duration: DURATION }
  : {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: MAX_VUS,
    };

const THRESHOLDS = {
  http_req_failed: ['rate<0.01'],
  checks: ['rate>0.99'],
  http_req_duration: [`p(99)<${P99_MS}`],
};
if (STREAM) {
  THRESHOLDS.ttfb = [`p(99)<${TTFB_P99_MS}`];
}

export const options = {
  scenarios: { [MAX ? `max_${MODE}` : `rate_${MODE}`]: scenario },
  thresholds: THRESHOLDS,
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(99)', 'max'],
  // Loopback only; no reason to wait minutes on a wedged target.
  setupTimeout: '10s',
  teardownTimeout: '10s',
};

// A realistic ~1.5 KB conversation: a system prompt and a few turns, built once per VU.
const SYSTEM_PROMPT =
  'You are a senior site-reliability engineer helping a teammate debug a production incident. ' +
  'Answer concisely, cite the exact metric or log line you rely on, and when you are unsure say so ' +
  'and propose the single cheapest experiment that would tell. Prefer commands that are read-only. ' +
  'Never suggest restarting a service as the first step; find the cause first.';
const MESSAGES = [
  { role: 'system', content: SYSTEM_PROMPT },
  {
    role: 'user',
    content:
      'Our API p99 went from 180 ms to 2.4 s at 14:05 UTC. Nothing was deployed. The database ' +
      'dashboards look flat, CPU on the app nodes is at 35%, but the connection-pool wait time ' +
      'metric jumped at the same minute. Where would you start?',
  },
  {
    role: 'assistant',
    content:
      'Pool wait rising while CPU and the database stay flat usually means connections are held ' +
      'longer, not that more are needed. Check (1) the slowest outbound call per request in the ' +
      'traces for 14:00-14:10, (2) whether any downstream dependency changed its latency at 14:05, ' +
      'and (3) pool size versus in-flight requests per node.',
  },
  {
    role: 'user',
    content:
      'Traces show a third-party geocoding call went from 40 ms to 2 s at 14:04, and we call it ' +
      'while holding a DB transaction open. Can you suggest a fix that we can ship today, and a ' +
      'longer-term one?',
  },
];
const MODEL = __ENV.MODEL || 'mock-model';
const PREFIXES = Math.max(1, parseInt(__ENV.PREFIXES || '1', 10));
function body(i) {
  // Conversation 0 is the plain one; the others differ in their system prompt only.
  const messages =
    i === 0 ? MESSAGES : [{ role: 'system', content: `${SYSTEM_PROMPT} (team ${i})` }].concat(MESSAGES.slice(1));
  return JSON.stringify(
    Object.assign(
      { model: MODEL, messages, temperature: 0.2, max_tokens: 256, user: 'k6-loadtest' },
      STREAM ? { stream: true, stream_options: { include_usage: true } } : {},
    ),
  );
}
const BODIES = Array.from({ length: PREFIXES }, (_, i) => body(i));
const PARAMS = {
  headers: {
    'Content-Type': 'application/json',
    Accept: STREAM ? 'text/event-stream' : 'application/json',
    Authorization: 'Bearer sk-loadtest-not-a-real-key',
  },
  tags: { name: 'chat_completions', mode: MODE },
  timeout: '30s',
};
const URL = `${BASE_URL}/chat/completions`;

export default function () {
  const res = http.post(URL, BODIES[(__VU * 7919 + __ITER) % PREFIXES], PARAMS);
  ttfb.add(res.timings.waiting);
  const body = typeof res.body === 'string' ? res.body : '';
  if (STREAM) {
    check(res, {
      'status is 200': (r) => r.status === 200,
      'stream ends with data: [DONE]': () => body.trimEnd().endsWith('data: [DONE]'),
      'stream carries a usage chunk': () => body.includes('"usage"'),
    });
  } else {
    check(res, {
      'status is 200': (r) => r.status === 200,
      'body is a chat.completion': () => body.includes('"chat.completion"'),
    });
  }
}

// Writes the full summary JSON to SUMMARY (if set) and a compact text summary to stdout.
export function handleSummary(data) {
  const header = `chat.js ${MAX ? `MAX (${VUS} VUs closed loop)` : `${RATE} req/s`} ${MODE} ${DURATION} -> ${URL}`;
  return summaryOutput(data, header, THRESHOLDS, ['ttfb'], SUMMARY);
}
