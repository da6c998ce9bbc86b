// The Responses API at a fixed rate: one turn (a system prompt and a ~1 KB question, close to
// chat.js) sent as `POST /v1/responses` or as the same turn in Chat Completions.
//
// Environment (plus lib.js): API = responses | chat | chain (default responses), TURNS (chain
// length, default 50), RUN_ID.
// - responses: `store: false`, a stateless turn that ctxgate translates to a chat request for the
//   chat-only mock and back. Direct (GATEWAY=0) there is no Responses server to ask, so the same
//   turn goes to the mock as Chat Completions: the baseline a Responses client would have if its
//   server spoke Responses itself at the mock's speed.
// - chat: the same turn as Chat Completions, direct and through ctxgate.
// - chain: each VU runs chains of TURNS turns, each turn naming the previous response
//   (`previous_response_id`, `store: true`), so ctxgate loads the chain from the store and commits
//   the new response every turn; one iteration is one turn. Gateway only.
// Checks: status 200, the body is a `response` (or `chat.completion`) with the mock's text; on a
// chain, each response's id differs from the last and the turn after it is accepted.
// Thresholds: http_req_failed < 1%, checks > 99%, http_req_duration p99 < P99_MS.
import http from 'k6/http';
import { check } from 'k6';
import { Counter } from 'k6/metrics';
import { BASE_URL, CHAT_URL, GATEWAY, P99_MS, jsonHeaders, options as scenarioOptions, parse, summary } from './lib.js';

const API = __ENV.API || 'responses';
const TURNS = parseInt(__ENV.TURNS || '50', 10);
const RESPONSES_URL = `${BASE_URL}/responses`;
if (!['responses', 'chat', 'chain'].includes(API)) {
  throw new Error(`API must be responses, chat or chain, not ${API}`);
}
if (API === 'chain' && !GATEWAY) {
  throw new Error('API=chain needs the gateway: the mock keeps no responses');
}

const chainsStarted = new Counter('chains_started');

const THRESHOLDS = {
  http_req_failed: ['rate<0.01'],
  checks: ['rate>0.99'],
  http_req_duration: [`p(99)<${P99_MS}`],
};
export const options = scenarioOptions(`responses-${API}`, THRESHOLDS);

const SYSTEM = 'You are a concise assistant. Answer in one short paragraph.';
// ~1 KB, close to chat.js's prompt, so the rows compare with the plain scenario.
const QUESTION =
  'Summarise the trade-offs between write-ahead logging and shadow paging for a small embedded ' +
  'key-value store, considering crash recovery time, write amplification, and concurrent readers. '.repeat(5);

function chatBody() {
  return JSON.stringify({
    model: 'mock-model',
    messages: [
      { role: 'system', content: SYSTEM },
      { role: 'user', content: QUESTION },
    ],
    max_tokens: 256,
  });
}

function responsesBody(store, previous, input) {
  const body = { model: 'mock-model', instructions: SYSTEM, input, max_output_tokens: 256, store };
  if (previous) body.previous_response_id = previous;
  return JSON.stringify(body);
}

/** The text of a Response object's first message item, or null. */
function outputText(response) {
  for (const item of (response && response.output) || []) {
    if (item.type === 'message') {
      for (const part of item.content || []) {
        if (part.type === 'output_text') return part.text;
      }
    }
  }
  return null;
}

function chatTurn() {
  const res = http.post(CHAT_URL, chatBody(), { headers: jsonHeaders(), tags: { name: 'chat_completions' }, timeout: '30s' });
  const answer = parse(res);
  check(res, {
    'status is 200': (r) => r.status === 200,
    'body is a chat.completion': () => answer !== null && answer.object === 'chat.completion',
  });
}

function responsesTurn() {
  const res = http.post(RESPONSES_URL, responsesBody(false, null, QUESTION), {
    headers: jsonHeaders(),
    tags: { name: 'responses' },
    timeout: '30s',
  });
  const answer = parse(res);
  check(res, {
    'status is 200': (r) => r.status === 200,
    'body is a completed response with text': () =>
      answer !== null && answer.object === 'response' && answer.status === 'completed' && !!outputText(answer),
  });
}

// Per-VU chain state: a VU runs its iterations one at a time, so a chain never has two turns in
// flight from this script.
let turn = 0;
let previous = null;
let chainNo = 0;

function chainTurn() {
  if (turn === 0) {
    previous = null;
    chainNo += 1;
    chainsStarted.add(1);
  }
  const input = `[${__ENV.RUN_ID || ''} vu${__VU} chain ${chainNo} turn ${turn + 1}] What should we check next?`;
  const res = http.post(RESPONSES_URL, responsesBody(true, previous, input), {
    headers: jsonHeaders(),
    tags: { name: 'responses' },
    timeout: '30s',
  });
  const answer = parse(res);
  const ok = res.status === 200 && answer !== null && answer.object === 'response' && answer.status === 'completed';
  const fresh = ok && typeof answer.id === 'string' && answer.id !== previous;
  check(res, {
    'status is 200': (r) => r.status === 200,
    'body is a completed response': () => ok,
    'a new response id each turn': () => fresh,
  });
  if (fresh) {
    previous = answer.id;
    turn = (turn + 1) % TURNS;
  } else {
    turn = 0; // a broken chain starts over rather than failing every later turn
  }
}

export default function () {
  if (API === 'chain') {
    chainTurn();
  } else if (API === 'responses' && GATEWAY) {
    responsesTurn();
  } else {
    chatTurn();
  }
}

export const handleSummary = summary(`responses.js (${API})`, THRESHOLDS);
