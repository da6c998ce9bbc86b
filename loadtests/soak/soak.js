// Soak load for ctxgate (loadtests/soak/run.sh): three scenarios at once for DURATION, while
// run.sh restarts the gateway underneath (SIGTERM and SIGKILL in turn).
//
//   plain    constant-arrival-rate PLAIN_RATE/s, non-streamed chat completions
//   stream   constant-arrival-rate STREAM_RATE/s, streamed; ABORT_FRAC of them are cut off after
//            ABORT_MS by a short k6 timeout (a client disconnect mid-stream)
//   session  SESSIONS VUs, each owning one session slot: one turn at a time, THINK_MS apart,
//            half of them streamed (ABORT_FRAC of those cut off as above). After TURNS turns a
//            slot moves on to a new session id, so transcripts stay bounded. Sessions alternate
//            between `X-Session-Mode: append` (the client sends only the new message; the
//            transcript is the gateway's) and the full-history style (the client resends what
//            it has been answered).
//
// Every user message of a session carries a unique marker `[turn <session>-<n>]`. Every request
// is logged as one JSON line on the console (run.sh sends it to a file with --console-output):
//   {"k":kind,"t0":start ms,"t1":end ms,"st":status,"ok":bool,"ab":intended abort,"e":k6 error code,
//    "em":k6 error text,"s":session,"m":marker,"md":"append"|"full"}
// `ok` is the client's view of success: 200 and a chat.completion body, or 200 and a stream that
// ended with `data: [DONE]` (on a session, `[DONE]` is sent only once the turn is saved).
// soak.py reads these lines: ok session turns are the acknowledged ones it looks for in the
// transcripts.
//
// Environment: BASE_URL (required, .../v1), DURATION (30m), PLAIN_RATE (4), STREAM_RATE (4),
// SESSIONS (12), THINK_MS (500), TURNS (40), ABORT_FRAC (0.2), ABORT_MS (120), RUN_ID.
import http from 'k6/http';
import { sleep } from 'k6';
import { Counter } from 'k6/metrics';

const BASE_URL = (__ENV.BASE_URL || '').replace(/\/+$/, '');
if (!BASE_URL) throw new Error('BASE_URL is required');
const CHAT_URL = `${BASE_URL}/chat/completions`;
const DURATION = __ENV.DURATION || '30m';
const PLAIN_RATE = parseInt(__ENV.PLAIN_RATE || '4', 10);
const STREAM_RATE = parseInt(__ENV.STREAM_RATE || '4', 10);
const SESSIONS = parseInt(__ENV.SESSIONS || '12', 10);
const THINK_MS = parseInt(__ENV.THINK_MS || '500', 10);
const TURNS = parseInt(__ENV.TURNS || '40', 10);
const ABORT_FRAC = parseFloat(__ENV.ABORT_FRAC || '0.2');
const ABORT_MS = parseInt(__ENV.ABORT_MS || '120', 10);
const RUN_ID = __ENV.RUN_ID || String(Date.now());
// Filler appended to every session user message, so the store grows faster (0: none).
const PAD_BYTES = parseInt(__ENV.PAD_BYTES || '0', 10);
const PAD = PAD_BYTES > 0 ? ' ' + 'filler '.repeat(Math.ceil(PAD_BYTES / 7)).slice(0, PAD_BYTES) : '';
const AUTH = 'Bearer sk-soak-not-a-real-key';

const okCount = new Counter('soak_ok');
const failCount = new Counter('soak_failed');
const abortCount = new Counter('soak_aborted_on_purpose');

export const options = {
  scenarios: {
    plain: {
      executor: 'constant-arrival-rate', exec: 'plain', rate: PLAIN_RATE, timeUnit: '1s',
      duration: DURATION, preAllocatedVUs: 4, maxVUs: 64,
    },
    stream: {
      executor: 'constant-arrival-rate', exec: 'stream', rate: STREAM_RATE, timeUnit: '1s',
      duration: DURATION, preAllocatedVUs: 6, maxVUs: 64,
    },
    session: { executor: 'constant-vus', exec: 'session', vus: SESSIONS, duration: DURATION },
  },
  // Errors are expected around restarts; run.sh and soak.py judge the run, not k6 thresholds.
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(99)', 'max'],
  setupTimeout: '10s',
  teardownTimeout: '10s',
};

const SYSTEM = 'You are a terse assistant. Answer in one short paragraph.';
const ASKS = [
  'What is the capital of France?',
  'Name three prime numbers above one hundred.',
  'Summarise the plot of Hamlet in two sentences.',
  'Which HTTP status means the request was throttled?',
  'How do I reverse a list in Python?',
];

function headers(extra) {
  return Object.assign({ 'Content-Type': 'application/json', Authorization: AUTH }, extra || {});
}

function streamDone(res) {
  return res.status === 200 && typeof res.body === 'string' && res.body.indexOf('data: [DONE]') >= 0;
}

function jsonOk(res) {
  if (res.status !== 200 || typeof res.body !== 'string') return null;
  try {
    const b = JSON.parse(res.body);
    return b && b.object === 'chat.completion' ? b : null;
  } catch (_) {
    return null;
  }
}

/** The assistant text of a finished stream (the concatenated deltas). */
function streamText(body) {
  let text = '';
  for (const line of body.split('\n')) {
    if (!line.startsWith('data: ') || line === 'data: [DONE]') continue;
    try {
      const ev = JSON.parse(line.slice(6));
      const d = ev.choices && ev.choices[0] && ev.choices[0].delta;
      if (d && typeof d.content === 'string') text += d.content;
    } catch (_) {
      // not a chat chunk
    }
  }
  return text;
}

function record(rec, res, ok, aborted) {
  rec.st = res.status;
  rec.ok = ok;
  rec.ab = aborted;
  if (res.error_code) rec.e = res.error_code;
  if (!ok && res.error) rec.em = String(res.error).slice(0, 160);
  rec.t1 = Date.now();
  if (ok) okCount.add(1);
  else if (aborted && res.status === 0) abortCount.add(1);
  else failCount.add(1);
  console.log(JSON.stringify(rec));
}

export function plain() {
  const body = JSON.stringify({
    model: 'mock-model',
    messages: [{ role: 'system', content: SYSTEM }, { role: 'user', content: ASKS[__ITER % ASKS.length] }],
    max_tokens: 64,
  });
  const rec = { k: 'plain', t0: Date.now() };
  const res = http.post(CHAT_URL, body, { headers: headers(), timeout: '30s', tags: { name: 'plain' } });
  record(rec, res, jsonOk(res) !== null, false);
}

export function stream() {
  const abort = Math.random() < ABORT_FRAC;
  const body = JSON.stringify({
    model: 'mock-model',
    messages: [{ role: 'system', content: SYSTEM }, { role: 'user', content: ASKS[__ITER % ASKS.length] }],
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: 64,
  });
  const rec = { k: 'stream', t0: Date.now() };
  const res = http.post(CHAT_URL, body, {
    headers: headers({ Accept: 'text/event-stream' }),
    timeout: abort ? `${ABORT_MS}ms` : '30s',
    tags: { name: abort ? 'stream_abort' : 'stream' },
  });
  record(rec, res, streamDone(res), abort);
}

// Per-VU state of the session scenario (a VU runs one iteration at a time).
let gen = -1;
let turn = TURNS;
let sid = '';
let history = [];

let append = false;

export function session() {
  if (turn >= TURNS) {
    gen += 1;
    turn = 0;
    // Modes alternate per VU and per session, so both get about half the sessions.
    append = (__VU + gen) % 2 === 0;
    sid = `soak-${RUN_ID}-v${__VU}-g${gen}`;
    history = [{ role: 'system', content: SYSTEM }];
  }
  turn += 1;
  const marker = `${sid}-${turn}`;
  const user = { role: 'user', content: `[turn ${marker}] ${ASKS[turn % ASKS.length]}${PAD}` };
  const streamed = Math.random() < 0.5;
  const abort = streamed && Math.random() < ABORT_FRAC;
  const req = { model: 'mock-model', messages: append ? [user] : history.concat([user]), max_tokens: 64 };
  if (streamed) {
    req.stream = true;
    req.stream_options = { include_usage: true };
  }
  const h = { 'X-Session-Id': sid };
  if (append) h['X-Session-Mode'] = 'append';
  if (streamed) h.Accept = 'text/event-stream';
  const rec = { k: streamed ? 'sess_stream' : 'sess_json', t0: Date.now(), s: sid, m: marker, md: append ? 'append' : 'full' };
  const res = http.post(CHAT_URL, JSON.stringify(req), {
    headers: headers(h),
    timeout: abort ? `${ABORT_MS}ms` : '30s',
    tags: { name: streamed ? (abort ? 'sess_stream_abort' : 'sess_stream') : 'sess_json' },
  });
  let ok = false;
  let answer = '';
  if (streamed) {
    ok = streamDone(res);
    if (ok) answer = streamText(res.body);
  } else {
    const b = jsonOk(res);
    ok = b !== null;
    if (ok) answer = (b.choices && b.choices[0] && b.choices[0].message && b.choices[0].message.content) || '';
  }
  record(rec, res, ok, abort);
  // The full-history client keeps what it was answered; an unanswered turn is not resent.
  if (!append && ok) history.push(user, { role: 'assistant', content: answer });
  sleep(THINK_MS / 1000);
}

export function handleSummary(data) {
  const m = data.metrics;
  const v = (name) => (m[name] ? m[name].values.count : 0);
  const line = `soak k6: ok ${v('soak_ok')}, failed ${v('soak_failed')}, aborted on purpose ${v('soak_aborted_on_purpose')}, http_reqs ${v('http_reqs')}\n`;
  const out = { stdout: line };
  if (__ENV.SUMMARY) out[__ENV.SUMMARY] = JSON.stringify(data, null, 1);
  return out;
}
