// Rate-limit enforcement: one gateway key whose `requests_per_minute` is below the offered
// rate. Offered RATE req/s for DURATION; the key admits BURST at once and then LIMIT_RPM per
// minute, so about BURST + LIMIT_RPM/60 * DURATION requests should get 200 and the rest 429.
// Gateway only (the mock has no limits, so there is nothing to compare directly).
//
// Environment (plus lib.js): API_KEY (the raw gateway key, required), LIMIT_RPM (the key's
// requests_per_minute, required), BURST (the key's burst, default LIMIT_RPM as in the config),
// TOLERANCE (allowed relative deviation of the admitted count, default 0.05).
// Checks: every response is 200 or 429; every 429 carries an integer Retry-After and the body
// `{"error":{"type":"requests","code":"rate_limit_exceeded",...}}`.
// Thresholds: checks > 99%, admitted count within TOLERANCE of the expected count, at least
// one 429, unexpected statuses < 1%, admitted_duration p99 < P99_MS.
import http from 'k6/http';
import { check } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';
import { CHAT_URL, DURATION, P99_MS, options as scenarioOptions, parse, seconds, summary } from './lib.js';

const API_KEY = __ENV.API_KEY || '';
const LIMIT_RPM = parseFloat(__ENV.LIMIT_RPM || '');
if (!API_KEY || !(LIMIT_RPM > 0)) {
  throw new Error('ratelimit.js needs API_KEY and LIMIT_RPM');
}
const BURST = parseFloat(__ENV.BURST || String(LIMIT_RPM));
const TOLERANCE = parseFloat(__ENV.TOLERANCE || '0.05');
const EXPECTED = BURST + (LIMIT_RPM / 60) * seconds(DURATION);

const admitted = new Counter('admitted');
const limited = new Counter('limited');
const unexpected = new Rate('unexpected_status');
const admittedDuration = new Trend('admitted_duration', true);
const retryAfter = new Trend('retry_after_seconds');

const THRESHOLDS = {
  checks: ['rate>0.99'],
  admitted: [`count>=${Math.floor(EXPECTED * (1 - TOLERANCE))}`, `count<=${Math.ceil(EXPECTED * (1 + TOLERANCE))}`],
  limited: ['count>0'],
  unexpected_status: ['rate<0.01'],
  admitted_duration: [`p(99)<${P99_MS}`],
};
export const options = scenarioOptions('ratelimit', THRESHOLDS);

// 429 is the point of this test, not a failure.
http.setResponseCallback(http.expectedStatuses(200, 429));

const BODY = JSON.stringify({
  model: 'mock-model',
  messages: [{ role: 'user', content: 'One short answer, please.' }],
  max_tokens: 16,
});
const PARAMS = {
  headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${API_KEY}` },
  tags: { name: 'chat_completions' },
  timeout: '30s',
};

export default function () {
  const res = http.post(CHAT_URL, BODY, PARAMS);
  unexpected.add(res.status !== 200 && res.status !== 429);
  if (res.status === 200) {
    admitted.add(1);
    admittedDuration.add(res.timings.duration);
    check(res, { 'admitted: chat.completion': (r) => (parse(r) || {}).object === 'chat.completion' });
    return;
  }
  if (res.status === 429) {
    limited.add(1);
    const after = res.headers['Retry-After'];
    if (after !== undefined && /^\d+$/.test(after)) retryAfter.add(parseInt(after, 10));
    const body = parse(res);
    check(res, {
      '429: integer Retry-After': () => after !== undefined && /^\d+$/.test(after),
      '429: code rate_limit_exceeded': () => body !== null && body.error && body.error.code === 'rate_limit_exceeded',
      '429: type requests': () => body !== null && body.error && body.error.type === 'requests',
    });
    return;
  }
  check(res, { 'status is 200 or 429': () => false });
}

export const handleSummary = summary('ratelimit.js', THRESHOLDS, ['admitted_duration', 'retry_after_seconds']);
