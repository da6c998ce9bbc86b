// Compression: long synthetic agent conversations (file reads, coloured test logs, a base64
// blob, each tool result a few hundred tokens) well past the small context_window scenarios.sh
// gives ctxgate (`[compression] mode = "rules"`), so every request is compacted. Each VU holds
// its own conversation and grows it by one turn per iteration (the full-history client style,
// no session: ctxgate keeps the compaction state keyed by the conversation's first messages);
// after TURNS turns it starts a new one, whose first request tokenises everything (cold).
//
// Environment (plus lib.js): STEPS (tool steps in a new conversation, default 12), TURNS
// (default 8), RUN_ID.
// Checks: status 200 and a chat.completion; through the gateway, `x-ctxgate-compression: rules`
// and x-ctxgate-tokens-after < x-ctxgate-tokens-before.
// Thresholds: http_req_failed < 1%, checks > 99%, http_req_duration p99 < P99_MS, and through
// the gateway `compacted` (share of responses marked rules) > 99%.
import http from 'k6/http';
import { check } from 'k6';
import { Rate, Trend } from 'k6/metrics';
import { CHAT_URL, GATEWAY, P99_MS, jsonHeaders, options as scenarioOptions, parse, summary } from './lib.js';

const STEPS = parseInt(__ENV.STEPS || '12', 10);
const TURNS = parseInt(__ENV.TURNS || '8', 10);
const RUN_ID = __ENV.RUN_ID || String(Date.now());

const compacted = new Rate('compacted');
const tokensBefore = new Trend('tokens_before');
const tokensAfter = new Trend('tokens_after');

const THRESHOLDS = {
  http_req_failed: ['rate<0.01'],
  checks: ['rate>0.99'],
  http_req_duration: [`p(99)<${P99_MS}`],
};
if (GATEWAY) THRESHOLDS.compacted = ['rate>0.99'];
export const options = scenarioOptions('compression', THRESHOLDS);

// A small deterministic generator, so a conversation's bytes depend on its id only.
function rng(seed) {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s;
  };
}
const WORDS = ['request', 'handler', 'retry', 'budget', 'token', 'stream', 'cache', 'session', 'limit',
  'upstream', 'buffer', 'frame', 'commit', 'lease', 'epoch', 'prefix', 'window', 'schema', 'route', 'queue'];
const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';

function fileListing(next, tag, n) {
  const lines = [];
  for (let j = 0; j < n; j++) {
    const a = WORDS[next() % WORDS.length];
    const b = WORDS[next() % WORDS.length];
    lines.push(`fn ${a}_${b}_${j}(ctx: &Context) -> Result<u64> { let v = ctx.${b}(${next() % 1000})?; Ok(v + ${j}) } // ${tag}`);
  }
  return lines.join('\n');
}

function testLog(next, tag, n) {
  const lines = [];
  for (let j = 0; j < n; j++) {
    const ok = next() % 7 !== 0;
    const colour = ok ? '\u001b[32mPASS\u001b[0m' : '\u001b[31mFAIL\u001b[0m';
    lines.push(`${colour} tests::${WORDS[next() % WORDS.length]}_${j} (${next() % 900} ms)   \t`);
  }
  return `${lines.join('\n')}\n\n\n${tag}: ${n} tests`;
}

function blob(next, n) {
  let s = '';
  for (let j = 0; j < n; j++) s += B64[next() % 64];
  return s;
}

/** A new conversation: system prompt, the task, then STEPS tool calls with their results. */
function newConversation(id, seed) {
  const next = rng(seed);
  const messages = [
    { role: 'system', content: 'You are a coding agent. Use the tools to read files and run tests; keep answers short.' },
    { role: 'user', content: `[${id}] The retry budget test is flaky on CI. Find out why and fix it.` },
  ];
  for (let i = 0; i < STEPS; i++) {
    const kind = i % 3;
    const name = kind === 0 ? 'read_file' : kind === 1 ? 'run_tests' : 'fetch_artifact';
    const args = kind === 0 ? { path: `src/${WORDS[i % WORDS.length]}.rs` } : kind === 1 ? { filter: WORDS[i % WORDS.length] } : { id: `${id}-${i}` };
    const callId = `call_${i}`;
    messages.push({
      role: 'assistant',
      content: null,
      tool_calls: [{ id: callId, type: 'function', function: { name, arguments: JSON.stringify(args) } }],
    });
    const tag = `${id}/${i}`;
    const content = kind === 0 ? fileListing(next, tag, 30) : kind === 1 ? testLog(next, tag, 30) : `artifact ${tag}: ${blob(next, 1200)}`;
    messages.push({ role: 'tool', tool_call_id: callId, content });
  }
  return messages;
}

let messages = [];
let turn = 0;
let conversationNo = 0;

export default function () {
  if (turn === 0) {
    const id = `k6-${RUN_ID}-vu${__VU}-c${conversationNo}`;
    messages = newConversation(id, __VU * 7919 + conversationNo * 104729 + 1);
    conversationNo += 1;
  }
  messages.push({ role: 'user', content: `Turn ${turn + 1}: what does the last result tell us, and what next?` });
  const body = JSON.stringify({ model: 'mock-model', messages, max_tokens: 256 });
  const res = http.post(CHAT_URL, body, { headers: jsonHeaders(), tags: { name: 'chat_completions' }, timeout: '30s' });
  const answer = parse(res);
  const checks = {
    'status is 200': (r) => r.status === 200,
    'body is a chat.completion': () => answer !== null && answer.object === 'chat.completion',
  };
  if (GATEWAY) {
    const acted = res.headers['X-Ctxgate-Compression'];
    const before = parseInt(res.headers['X-Ctxgate-Tokens-Before'] || '', 10);
    const after = parseInt(res.headers['X-Ctxgate-Tokens-After'] || '', 10);
    const shrunk = acted === 'rules' && after < before;
    compacted.add(shrunk);
    if (Number.isFinite(before)) tokensBefore.add(before);
    if (Number.isFinite(after)) tokensAfter.add(after);
    checks['x-ctxgate-compression is rules'] = () => acted === 'rules';
    checks['tokens after < before'] = () => after < before;
  }
  check(res, checks);
  const content = answer && answer.choices && answer.choices[0] ? answer.choices[0].message.content : '';
  messages.push({ role: 'assistant', content: content || '' });
  turn = (turn + 1) % TURNS;
}

export const handleSummary = summary('compression.js', THRESHOLDS, ['tokens_before', 'tokens_after']);
