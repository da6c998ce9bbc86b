// Gateway tool fan-out. mock-upstream runs with `--tool-calls N`: its first answer calls the
// tool `lookup` N times in parallel, and once the conversation ends with tool results it gives
// the final answer. The tool is an HTTP endpoint (mock-upstream's `POST /tools/lookup`).
//
// GATEWAY=1: one request to ctxgate, which has `lookup` configured as a gateway tool
//   (`[[tools]]`, inject = true) and runs the loop itself: model, N tool calls at once, model.
// GATEWAY=0: the same turn run by the client against the mock directly: model, the N tool
//   calls at once (http.batch), model again with the results. That is what ctxgate replaces.
// `turn_duration` is the whole turn either way, from k6's request timings (sending + waiting +
// receiving; k6 has no sub-millisecond clock for JS): through the gateway the one request's
// duration; direct, model call + the slowest of the parallel tool calls + model call, i.e. a
// client with no processing time of its own.
//
// Environment (plus lib.js): TOOL_CALLS (N, must match the mock's flag, default 4), TOOL_URL
// (direct mode: the tool endpoint, default BASE_URL's origin + /tools/lookup).
// Checks: final answer is a chat.completion; through the gateway x-ctxgate-tool-rounds is 1 and
// the answer's `ctxgate.tool_runs` has N runs, all `ok`; direct, the model asked for N calls
// and every tool call returned 200.
// Thresholds: http_req_failed < 1%, checks > 99%, turn_duration p99 < P99_MS.
import http from 'k6/http';
import { check } from 'k6';
import { Trend } from 'k6/metrics';
import { BASE_URL, CHAT_URL, GATEWAY, P99_MS, jsonHeaders, options as scenarioOptions, parse, summary } from './lib.js';

const TOOL_CALLS = parseInt(__ENV.TOOL_CALLS || '4', 10);
const TOOL_URL = __ENV.TOOL_URL || `${BASE_URL.replace(/^(https?:\/\/[^/]+).*$/, '$1')}/tools/lookup`;

const turnDuration = new Trend('turn_duration', true);

const THRESHOLDS = {
  http_req_failed: ['rate<0.01'],
  checks: ['rate>0.99'],
  turn_duration: [`p(99)<${P99_MS}`],
};
export const options = scenarioOptions('tools', THRESHOLDS);

const TOOL = {
  type: 'function',
  function: {
    name: 'lookup',
    description: 'Looks an item up in the inventory.',
    parameters: { type: 'object', properties: { q: { type: 'string' } }, required: ['q'] },
  },
};
const MESSAGES = [
  { role: 'system', content: 'You are an inventory assistant. Look items up before answering.' },
  { role: 'user', content: 'Check stock for the four items on my list and tell me which ones to reorder.' },
];
const PARAMS = { headers: jsonHeaders(), tags: { name: 'chat_completions' }, timeout: '30s' };

/** Returns the turn's duration in ms. */
function gatewayTurn() {
  // ctxgate injects the `lookup` definition itself.
  const res = http.post(CHAT_URL, JSON.stringify({ model: 'mock-model', messages: MESSAGES }), PARAMS);
  const answer = parse(res);
  const runs = answer && answer.ctxgate ? answer.ctxgate.tool_runs || [] : [];
  check(res, {
    'status is 200': (r) => r.status === 200,
    'final answer is a chat.completion': () =>
      answer !== null && answer.object === 'chat.completion' && answer.choices[0].finish_reason === 'stop',
    'one tool round': (r) => r.headers['X-Ctxgate-Tool-Rounds'] === '1',
    'every tool call ran ok': () => runs.length === TOOL_CALLS && runs.every((run) => run.outcome === 'ok'),
  });
  return res.timings.duration;
}

/** Returns the turn's duration in ms. */
function directTurn() {
  const first = http.post(CHAT_URL, JSON.stringify({ model: 'mock-model', messages: MESSAGES, tools: [TOOL] }), PARAMS);
  const answer = parse(first);
  const message = answer && answer.choices ? answer.choices[0].message : null;
  const calls = message && message.tool_calls ? message.tool_calls : [];
  const results = http.batch(
    calls.map((c) => ({
      method: 'POST',
      url: TOOL_URL,
      body: c.function.arguments,
      params: { headers: { 'Content-Type': 'application/json' }, tags: { name: 'tool' }, timeout: '30s' },
    })),
  );
  const messages = MESSAGES.concat([message || { role: 'assistant', content: '' }]).concat(
    calls.map((c, i) => ({ role: 'tool', tool_call_id: c.id, content: results[i].body || '' })),
  );
  const final = http.post(CHAT_URL, JSON.stringify({ model: 'mock-model', messages, tools: [TOOL] }), PARAMS);
  const done = parse(final);
  check(final, {
    'status is 200': (r) => first.status === 200 && r.status === 200,
    'final answer is a chat.completion': () =>
      done !== null && done.object === 'chat.completion' && done.choices[0].finish_reason === 'stop',
    'model asked for every call': () => calls.length === TOOL_CALLS,
    'every tool call ran ok': () => results.every((r) => r.status === 200),
  });
  const slowestTool = results.reduce((m, r) => Math.max(m, r.timings.duration), 0);
  return first.timings.duration + slowestTool + final.timings.duration;
}

export default function () {
  turnDuration.add(GATEWAY ? gatewayTurn() : directTurn());
}

export const handleSummary = summary('tools.js', THRESHOLDS, ['turn_duration']);
