// Multi-turn sessions: each VU holds its own conversation and sends it, growing, turn after
// turn (the full-history client style: every request carries the whole history), with an
// X-Session-Id through the gateway. After TURNS turns the VU starts a new session, so the
// history stays bounded. One iteration is one turn.
//
// Environment (plus lib.js): TURNS (default 8), RUN_ID (makes session ids unique per run).
// Checks: status 200 and a chat.completion; through the gateway, x-ctxgate-session-version is
// present and grows within a session (each turn is committed).
// Thresholds: http_req_failed < 1%, checks > 99%, http_req_duration p99 < P99_MS.
import http from 'k6/http';
import { check } from 'k6';
import { Counter } from 'k6/metrics';
import { CHAT_URL, GATEWAY, P99_MS, jsonHeaders, options as scenarioOptions, parse, summary } from './lib.js';

const TURNS = parseInt(__ENV.TURNS || '8', 10);
const RUN_ID = __ENV.RUN_ID || String(Date.now());

const sessionsStarted = new Counter('sessions_started');

const THRESHOLDS = {
  http_req_failed: ['rate<0.01'],
  checks: ['rate>0.99'],
  http_req_duration: [`p(99)<${P99_MS}`],
};
export const options = scenarioOptions('sessions', THRESHOLDS);

const SYSTEM =
  'You are a careful release manager. Keep answers short, list risks first, and never approve a ' +
  'change without a rollback plan.';
const ASKS = [
  'We want to ship the new billing export on Friday. What do you need from us first?',
  'The export touches the invoices table; the migration adds two nullable columns. Risky?',
  'Rollback is a feature flag plus a down-migration that drops the columns. Enough?',
  'QA found a rounding difference of one cent on 0.3% of invoices. Block or ship?',
  'Finance says one cent is fine if we document it. Draft the release note line.',
  'The on-call engineer is new. What should the runbook say about this export?',
  'Monitoring: which two metrics would tell us within ten minutes that it went wrong?',
  'Summarise the decision and the open items for the change ticket.',
];

// Per-VU state: VUs run their iterations one at a time, so a session never has two turns in
// flight from this script.
let history = [];
let turn = 0;
let sessionNo = 0;
let sessionId = '';
let lastVersion = -1;

export default function () {
  if (turn === 0) {
    sessionId = `k6-${RUN_ID}-vu${__VU}-s${sessionNo}`;
    sessionNo += 1;
    history = [{ role: 'system', content: SYSTEM }];
    lastVersion = -1;
    sessionsStarted.add(1);
  }
  history.push({ role: 'user', content: `[${sessionId} turn ${turn + 1}] ${ASKS[turn % ASKS.length]}` });
  const body = JSON.stringify({ model: 'mock-model', messages: history, max_tokens: 256 });
  const headers = jsonHeaders(GATEWAY ? { 'X-Session-Id': sessionId } : {});
  const res = http.post(CHAT_URL, body, { headers, tags: { name: 'chat_completions' }, timeout: '30s' });
  const answer = parse(res);
  const content =
    answer && answer.choices && answer.choices[0] && answer.choices[0].message
      ? answer.choices[0].message.content
      : null;
  const checks = {
    'status is 200': (r) => r.status === 200,
    'body is a chat.completion': () => answer !== null && answer.object === 'chat.completion',
  };
  if (GATEWAY) {
    const version = parseInt(res.headers['X-Ctxgate-Session-Version'] || '', 10);
    const grew = Number.isFinite(version) && version > lastVersion;
    checks['session version grows'] = () => grew;
    if (Number.isFinite(version)) lastVersion = version;
  }
  check(res, checks);
  history.push({ role: 'assistant', content: content === null ? '' : content });
  turn = (turn + 1) % TURNS;
}

export const handleSummary = summary('sessions.js', THRESHOLDS);
