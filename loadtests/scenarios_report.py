#!/usr/bin/env python3
"""Turns one scenarios.sh work directory into the markdown report (stdout).

Inputs, written by scenarios.sh into WORK:
  cases.tsv    one line per scenario: id, rate, duration, direct k6 summary JSON and exit code
               (empty without a direct run), gateway summary JSON and exit code, the ctxgate
               /metrics scrapes before/after the gateway run, the 1-minute load average at the
               end of the direct and gateway runs, extra facts (k=v;...), ctxgate's log.
  skipped.tsv  scenario, "skipped", reason.
Run metadata comes from LT_* environment variables.

The overhead quantiles are ctxgate's own `ctxgate_gateway_overhead_seconds{route="chat_completions"}`,
diffed between the two scrapes, so each scenario counts only its own gateway run; bucket
resolution, interpolated like Prometheus' histogram_quantile (helpers shared with report.py).
"""

import csv
import os
import re
import sys

from report import buckets, diff, env, fmt_hist_ms, fmt_ms, k6_status, load_json, metric, quantile, samples

# The k6 metric each scenario is judged by; stream also shows the whole stream.
MAIN_METRIC = {
    'plain': [('http_req_duration', 'duration')],
    'stream': [('ttfb', 'TTFB'), ('http_req_duration', 'full stream')],
    'sessions': [('http_req_duration', 'duration')],
    'compression': [('http_req_duration', 'duration')],
    'tools': [('turn_duration', 'whole turn')],
    'ratelimit': [('admitted_duration', 'duration of 200s')],
}
# The route label of ctxgate's overhead histogram each scenario is read from.
ROUTE = {'responses': 'responses', 'chain': 'responses'}
WHAT = {
    'plain': 'non-streamed chat, ~1.5 KB prompt',
    'stream': 'streamed chat (8 chunks + usage)',
    'sessions': 'X-Session-Id on Redis, full history, {turns} turns a session',
    'compression': 'rules compaction of long agent conversations (tokens below), window 4096',
    'tools': 'gateway tool loop, {calls} parallel HTTP tool calls a turn',
    'ratelimit': 'a gateway key over its requests_per_minute',
    'responses-chat': 'one chat turn (~1 KB prompt), Chat Completions through ctxgate',
    'responses': 'the same turn as `POST /v1/responses` (store: false), translated for the chat-only mock; '
                 'direct = the chat turn',
    'chain': '`previous_response_id` chains on Redis (store: true), {chain_turns} turns a chain',
}


def seconds(text):
    """A k6 duration ("30s", "1m30s", "500ms") in seconds."""
    units = {'ms': 0.001, 's': 1, 'm': 60, 'h': 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r'(\d+(?:\.\d+)?)(ms|s|m|h)', text))


def counter_delta(before, after, name, **match):
    """Sum of `name` samples whose labels include `match`, after minus before."""
    def total(rows):
        return sum(v for n, labels, v in rows if n == name and all(labels.get(k) == w for k, w in match.items()))
    return total(after) - total(before)


def by_label(before, after, name, label, **match):
    keys = sorted({labels.get(label) for n, labels, _ in after if n == name and label in labels})
    return {k: counter_delta(before, after, name, **{label: k}, **match) for k in keys}


def errors_of(summary):
    if not summary:
        return 'no summary'
    reqs = metric(summary, 'http_reqs', 'count') or 0
    failed = round((metric(summary, 'http_req_failed', 'rate') or 0) * reqs)
    check_fails = int(metric(summary, 'checks', 'fails') or 0)
    dropped = int(metric(summary, 'dropped_iterations', 'count') or 0)
    parts = []
    if failed:
        parts.append(f'{failed} failed')
    if check_fails:
        parts.append(f'{check_fails} failed checks')
    if dropped:
        parts.append(f'{dropped} dropped')
    return ', '.join(parts) if parts else '0'


def checks_of(summary):
    """[(name, passes, fails)] of every check in a k6 summary."""
    out = []

    def walk(group):
        for c in group.get('checks', []) or []:
            out.append((c.get('name', '?'), c.get('passes', 0), c.get('fails', 0)))
        for g in group.get('groups', []) or []:
            walk(g)

    walk((summary or {}).get('root_group', {}))
    return out


def failed_thresholds(summary):
    out = []
    for name, m in (summary or {}).get('metrics', {}).items():
        for expr, t in (m.get('thresholds') or {}).items():
            if not t.get('ok', True):
                out.append(f'`{name} {expr}`')
    return out


def main():
    work = sys.argv[1]
    fields = ['id', 'rate', 'duration', 'd_json', 'd_rc', 'g_json', 'g_rc', 'm_before', 'm_after',
              'd_load', 'g_load', 'extra', 'gw_log']
    with open(os.path.join(work, 'cases.tsv'), encoding='utf-8') as f:
        cases = [dict(zip(fields, row)) for row in csv.reader(f, delimiter='\t') if row]
    skipped = []
    if os.path.exists(os.path.join(work, 'skipped.tsv')):
        with open(os.path.join(work, 'skipped.tsv'), encoding='utf-8') as f:
            skipped = [row for row in csv.reader(f, delimiter='\t') if row]

    for c in cases:
        c['d'] = load_json(c['d_json']) if c['d_json'] else None
        c['g'] = load_json(c['g_json'])
        route = ROUTE.get(c['id'], 'chat_completions')
        h = diff(buckets(c['m_after'], 'ctxgate_gateway_overhead_seconds', route),
                 buckets(c['m_before'], 'ctxgate_gateway_overhead_seconds', route))
        c['ovh_n'] = int(h.get(float('inf'), 0))
        c['ovh_p50'], c['ovh_p99'] = quantile(0.50, h), quantile(0.99, h)
        c['before'], c['after'] = samples(c['m_before']), samples(c['m_after'])
        c['extra_kv'] = dict(kv.split('=', 1) for kv in c['extra'].split(';') if '=' in kv)

    quick = env('LT_QUICK') == '1'
    lines = []
    w = lines.append
    w(f"# ctxgate feature scenarios — {env('LT_DATE')}"
      + (' (QUICK smoke run: short and low-rate, not for comparison)' if quick else ''))
    w('')
    w(f"- Machine: {env('LT_NPROC')} cores ({env('LT_CPU')}), kernel {env('LT_KERNEL')}; k6, "
      'mock-upstream, redis-server and ctxgate share them with whatever else runs. 1-minute load '
      f"average {env('LT_LOAD_START')} at the start, {env('LT_LOAD_END')} at the end (per run below).")
    w(f"- ctxgate {env('LT_GIT')}, release build of {env('LT_BIN_BUILT')}; k6 {env('LT_K6_VERSION')}; "
      'mock-upstream answers at once (no latency, 8 chunks, no chunk delay).')
    w('- Each scenario gets a fresh mock-upstream, redis-server (sessions, compression) and ctxgate '
      'with its own config; a short warm-up through the gateway, then k6 against the mock directly '
      'and then through ctxgate, back to back, at the same constant arrival rate.')
    w('- Latencies in ms. "Added" = gateway percentile minus direct percentile (a difference of '
      'percentiles). "ctxgate overhead" = p50/p99 of ctxgate\'s own '
      '`ctxgate_gateway_overhead_seconds{route="chat_completions"}` (`route="responses"` for the '
      'responses and chain rows; time to response headers minus '
      'time waiting on the upstream), from the bucket counts added during the gateway run only; '
      'bucket resolution (10µs, 25µs, 50µs, 100µs, 250µs, 500µs, 1ms, 2.5ms, 5ms, …), '
      'interpolated inside a bucket.')
    w('')
    w('## Overhead per feature')
    w('')
    w('| Scenario | What | Rate req/s: target (direct / gateway) | k6 metric | Direct p50 / p99 | '
      'Gateway p50 / p99 | **Added p50 / p99** | ctxgate overhead p50 / p99 (hist, n) | '
      'Errors (direct / gateway) | k6 thresholds (direct / gateway) | Load avg (direct / gateway) |')
    w('|---|---|---|---|---|---|---|---|---|---|---|')
    for c in cases:
        what = WHAT.get(c['id'], '').format(turns=env('LT_TURNS'), calls=env('LT_TOOL_CALLS'),
                                            chain_turns=env('LT_CHAIN_TURNS'))
        d_rate = metric(c['d'], 'http_reqs', 'rate')
        g_rate = metric(c['g'], 'http_reqs', 'rate')
        iters = lambda s: metric(s, 'iterations', 'rate')  # noqa: E731
        # Tools and sessions: one iteration is one turn; show turns/s (tools direct makes 2+N requests a turn).
        if c['id'] == 'tools':
            d_rate, g_rate = iters(c['d']), iters(c['g'])
        rates = f"{c['rate']} ({'–' if d_rate is None else f'{d_rate:.0f}'} / {g_rate or 0:.0f})"
        for i, (name, label) in enumerate(MAIN_METRIC.get(c['id'], [('http_req_duration', 'duration')])):
            d50, d99 = metric(c['d'], name, 'med'), metric(c['d'], name, 'p(99)')
            g50, g99 = metric(c['g'], name, 'med'), metric(c['g'], name, 'p(99)')
            a50 = g50 - d50 if None not in (g50, d50) else None
            a99 = g99 - d99 if None not in (g99, d99) else None
            first = i == 0
            direct = f'{fmt_ms(d50)} / {fmt_ms(d99)}' if c['d'] else 'no direct run'
            added = f'**{fmt_ms(a50, True)} / {fmt_ms(a99, True)}**' if c['d'] else '–'
            cells = [c['id'] if first else '', what if first else '', rates if first else '', label, direct,
                     f'{fmt_ms(g50)} / {fmt_ms(g99)}', added]
            if first:
                cells += [f"{fmt_hist_ms(c['ovh_p50'])} / {fmt_hist_ms(c['ovh_p99'])} (n={c['ovh_n']})",
                          f"{errors_of(c['d']) if c['d'] else '–'} / {errors_of(c['g'])}",
                          f"{k6_status(c['d_rc']) if c['d'] else '–'} / {k6_status(c['g_rc'])}",
                          f"{c['d_load'] or '–'} / {c['g_load']}"]
            else:
                cells += ['', '', '', '']
            w('| ' + ' | '.join(cells) + ' |')
    for s in skipped:
        w(f'| {s[0]} | {WHAT.get(s[0], "")} | skipped | | | | | | | | |')
    w('')

    w('## What each feature did')
    w('')
    for c in cases:
        b, a, g = c['before'], c['after'], c['g']
        route = ROUTE.get(c['id'], 'chat_completions')
        statuses = by_label(b, a, 'ctxgate_requests_total', 'status', route=route)
        status_text = ', '.join(f'{k}: {v:g}' for k, v in statuses.items() if v) or 'none'
        w(f"**{c['id']}** (gateway run: ctxgate `requests_total{{route=\"{route}\"}}` by status {status_text}"
          + (f"; ctxgate errors: {', '.join(f'{k} {v:g}' for k, v in by_label(b, a, 'ctxgate_errors_total', 'kind').items() if v)}"
             if any(by_label(b, a, 'ctxgate_errors_total', 'kind').values()) else '') + ')')
        w('')
        if c['id'] == 'sessions':
            commits = by_label(b, a, 'ctxgate_session_commits_total', 'outcome')
            busy = counter_delta(b, a, 'ctxgate_session_busy_total')
            rewrites = counter_delta(b, a, 'ctxgate_session_history_rewrites_total')
            store_err = counter_delta(b, a, 'ctxgate_session_store_errors_total')
            started = metric(g, 'sessions_started', 'count') or 0
            w(f"- {started:.0f} sessions started, {metric(g, 'http_reqs', 'count') or 0:.0f} turns; session "
              f"commits {', '.join(f'{k} {v:g}' for k, v in commits.items()) or 'none'}; busy (409) {busy:g}; "
              f"history rewrites {rewrites:g}; store errors {store_err:g}.")
        elif c['id'] == 'chain':
            commits = by_label(b, a, 'ctxgate_session_commits_total', 'outcome')
            store_err = counter_delta(b, a, 'ctxgate_session_store_errors_total')
            started = metric(g, 'chains_started', 'count') or 0
            w(f"- {started:.0f} chains started, {metric(g, 'http_reqs', 'count') or 0:.0f} turns; session "
              f"commits {', '.join(f'{k} {v:g}' for k, v in commits.items()) or 'none'}; store errors {store_err:g}. "
              'Each turn loads its chain from Redis and commits the new response before answering.')
        elif c['id'] == 'compression':
            stages = by_label(b, a, 'ctxgate_compression_requests_total', 'stage')
            epochs = by_label(b, a, 'ctxgate_compression_epochs_total', 'stage')
            tb = counter_delta(b, a, 'ctxgate_compression_tokens_total', stage='before')
            ta = counter_delta(b, a, 'ctxgate_compression_tokens_total', stage='after')
            share = metric(g, 'compacted', 'rate')
            w(f"- Requests by outcome {', '.join(f'{k} {v:g}' for k, v in stages.items() if v) or 'none'}; "
              f"epochs {', '.join(f'{k} {v:g}' for k, v in epochs.items() if v) or 'none'}; prompt tokens "
              f"{tb:,.0f} → {ta:,.0f}" + (f" (−{100 * (1 - ta / tb):.1f}%)" if tb else '') + '.')
            w(f"- k6: `x-ctxgate-compression: rules` with fewer tokens after on "
              f"{'–' if share is None else f'{100 * share:.2f}%'} of responses; tokens before p50 "
              f"{metric(g, 'tokens_before', 'med') or 0:.0f}, after p50 {metric(g, 'tokens_after', 'med') or 0:.0f}.")
        elif c['id'] == 'tools':
            outcomes = by_label(b, a, 'ctxgate_tool_calls_total', 'outcome')
            rounds_sum = counter_delta(b, a, 'ctxgate_tool_rounds_sum')
            rounds_n = counter_delta(b, a, 'ctxgate_tool_rounds_count')
            w(f"- Tool calls by outcome {', '.join(f'{k} {v:g}' for k, v in outcomes.items() if v) or 'none'}; "
              f"{rounds_n:g} chat requests ran {rounds_sum:g} tool rounds. Direct, k6 ran the same loop itself "
              f"({metric(c['d'], 'http_reqs', 'count') or 0:.0f} HTTP requests for "
              f"{metric(c['d'], 'iterations', 'count') or 0:.0f} turns).")
            w('- The overhead histogram subtracts every model call (to its last body byte) and the tool '
              'round (since commit 2da49e6; before it, only the last model call), so it holds the '
              'gateway\'s own work on the turn.')
        elif c['id'] == 'ratelimit':
            kv = c['extra_kv']
            rpm, burst = float(kv.get('limit_rpm', 0)), float(kv.get('burst', 0))
            dur = seconds(c['duration'])
            admitted = metric(g, 'admitted', 'count') or 0
            limited = metric(g, 'limited', 'count') or 0
            expected = burst + rpm / 60 * dur
            steady = (admitted - burst) / dur if dur else 0
            w(f"- Key: requests_per_minute {rpm:g} ({rpm / 60:g}/s), burst {burst:g}, store `{kv.get('store', '?')}`; "
              f"offered {c['rate']}/s for {c['duration']}.")
            w(f"- Admitted {admitted:.0f} (expected burst + rate × duration = {expected:.0f}: "
              + (f"{100 * (admitted / expected - 1):+.1f}%" if expected else '–')
              + f"); limited (429) {limited:.0f}. Admitted rate after the burst {steady:.2f}/s against the "
              f"limit's {rpm / 60:.2f}/s (" + (f"{100 * (steady / (rpm / 60) - 1):+.1f}%" if rpm else '–') + ').')
            refused = by_label(b, a, 'ctxgate_rate_limited_total', 'limit')
            w(f"- ctxgate `rate_limited_total` by limit: {', '.join(f'{k} {v:g}' for k, v in refused.items() if v) or 'none'}; "
              f"Redis fallbacks {counter_delta(b, a, 'ctxgate_rate_limit_fallbacks_total'):g}; "
              f"local pre-check rejections {counter_delta(b, a, 'ctxgate_rate_limit_local_rejections_total'):g}.")
            ra_min, ra_max = metric(g, 'retry_after_seconds', 'min'), metric(g, 'retry_after_seconds', 'max')
            w('- The overhead histogram counts the admitted requests only (a 429 never reaches the upstream).')
            w(f"- Retry-After ranged {'–' if ra_min is None else f'{ra_min:g}'}–{'–' if ra_max is None else f'{ra_max:g}'} s.")
        checks = checks_of(g)
        if checks:
            w('- Gateway checks (passed / failed): ' + '; '.join(f'{n} {p} / {f}' for n, p, f in checks) + '.')
        bad = failed_thresholds(c['d']) + failed_thresholds(c['g'])
        if bad:
            w(f"- **Failed thresholds**: {', '.join(bad)}.")
        if os.path.exists(c['gw_log']) and os.path.getsize(c['gw_log']) > 0:
            with open(c['gw_log'], encoding='utf-8', errors='replace') as f:
                first = [line.rstrip() for line in f][:3]
            w(f"- ctxgate logged (warn and above), first lines: `{' / '.join(first)[:300]}`")
        w('')
    for s in skipped:
        w(f"**{s[0]}**: skipped: {s[2] if len(s) > 2 else ''}")
        w('')
    w(f"Wall time of this run up to the report: {env('LT_WALL')} s.")
    sys.stdout.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
