// Shared by the feature scenarios (sessions.js, compression.js, tools.js, ratelimit.js): the
// environment, the open-model executor, and the summary writer. scenarios.sh runs each script
// against mock-upstream directly (GATEWAY=0) and through ctxgate (GATEWAY=1).
//
// Common environment:
//   BASE_URL   target base URL, e.g. http://127.0.0.1:8080/v1 (required)
//   GATEWAY    1 = the target is ctxgate, so gateway-only checks apply (default 0)
//   RATE       arrivals per second (default 100); DURATION (default 20s)
//   VUS        preallocated VUs (default max(10, RATE/10)); MAX_VUS cap (default 4*VUS)
//   P99_MS     the p99 threshold of the scenario's main latency metric, ms (default 250)
//   SUMMARY    where to write the full k6 summary JSON (default: none)

export const BASE_URL = (__ENV.BASE_URL || '').replace(/\/+$/, '');
if (!BASE_URL) {
  throw new Error('BASE_URL is required, e.g. BASE_URL=http://127.0.0.1:8080/v1');
}
export const GATEWAY = __ENV.GATEWAY === '1';
export const RATE = parseInt(__ENV.RATE || '100', 10);
export const DURATION = __ENV.DURATION || '20s';
export const VUS = parseInt(__ENV.VUS || String(Math.max(10, Math.ceil(RATE / 10))), 10);
export const MAX_VUS = parseInt(__ENV.MAX_VUS || String(VUS * 4), 10);
export const P99_MS = parseFloat(__ENV.P99_MS || '250');
export const SUMMARY = __ENV.SUMMARY || '';
export const CHAT_URL = `${BASE_URL}/chat/completions`;

/** k6 duration text ("20s", "1m30s", "500ms") in seconds. */
export function seconds(text) {
  let total = 0;
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h)/g;
  let m;
  while ((m = re.exec(text)) !== null) {
    const n = parseFloat(m[1]);
    total += m[2] === 'ms' ? n / 1000 : m[2] === 's' ? n : m[2] === 'm' ? n * 60 : n * 3600;
  }
  return total;
}

/** The open model every scenario uses: RATE arrivals per second for DURATION. */
export function arrivals(name) {
  return {
    [name]: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: MAX_VUS,
    },
  };
}

export function options(name, thresholds) {
  return {
    scenarios: arrivals(name),
    thresholds,
    summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(99)', 'max'],
    setupTimeout: '10s',
    teardownTimeout: '10s',
  };
}

export function jsonHeaders(extra) {
  return Object.assign(
    { 'Content-Type': 'application/json', Accept: 'application/json', Authorization: 'Bearer sk-loadtest-not-a-real-key' },
    extra || {},
  );
}

/** The response body as JSON, or null. */
export function parse(res) {
  try {
    return typeof res.body === 'string' ? JSON.parse(res.body) : null;
  } catch (_) {
    return null;
  }
}

function ms(v) {
  return v === undefined ? '-' : `${v.toFixed(3)}ms`;
}

function trendLine(data, name) {
  const m = data.metrics[name];
  if (!m) return null;
  const v = m.values;
  return `  ${name.padEnd(18)} avg=${ms(v.avg)} med=${ms(v.med)} p90=${ms(v['p(90)'])} p99=${ms(v['p(99)'])} max=${ms(v.max)}`;
}

/**
 * handleSummary's result: `header`, the request counts, `http_req_duration` and `trends`, and
 * each threshold's verdict as compact text on stdout; the full JSON to `summaryPath` if set.
 * Shared with chat.js.
 */
export function summaryOutput(data, header, thresholds, trends, summaryPath) {
  const m = data.metrics;
  const count = (name) => (m[name] ? m[name].values.count : 0);
  const reqs = m.http_reqs ? m.http_reqs.values : { count: 0, rate: 0 };
  const failed = m.http_req_failed ? m.http_req_failed.values.rate : 0;
  const checks = m.checks ? m.checks.values : { passes: 0, fails: 0 };
  const lines = [
    '',
    header,
    `  requests           ${reqs.count} (${reqs.rate.toFixed(1)}/s), failed ${(failed * 100).toFixed(2)}%, ` +
      `dropped iterations ${count('dropped_iterations')}, checks ${checks.passes} ok / ${checks.fails} failed`,
  ];
  for (const t of ['http_req_duration'].concat(trends || [])) {
    const line = trendLine(data, t);
    if (line) lines.push(line);
  }
  for (const metric of Object.keys(thresholds)) {
    const thr = m[metric] && m[metric].thresholds ? m[metric].thresholds : {};
    for (const expr of thresholds[metric]) {
      const ok = thr[expr] ? thr[expr].ok : undefined;
      lines.push(`  threshold ${metric} ${expr}: ${ok === undefined ? '?' : ok ? 'pass' : 'FAIL'}`);
    }
  }
  const out = { stdout: lines.join('\n') + '\n' };
  if (summaryPath) out[summaryPath] = JSON.stringify(data, null, 2);
  return out;
}

/** handleSummary for a scenario: compact text on stdout, the full JSON to SUMMARY. */
export function summary(title, thresholds, trends) {
  return function (data) {
    const header = `${title} ${RATE}/s ${DURATION} -> ${BASE_URL}${GATEWAY ? ' (gateway)' : ' (direct)'}`;
    return summaryOutput(data, header, thresholds, trends, SUMMARY);
  };
}
