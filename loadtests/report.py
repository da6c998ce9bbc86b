#!/usr/bin/env python3
"""Turns one run.sh work directory into the markdown results report (stdout).

Inputs, all written by run.sh into WORK:
  cases.tsv      one line per measured case: id, mode (json|stream), kind (rate|max), target rate,
                 VUs, duration, then for DIRECT and GATEWAY: k6 summary JSON path and k6 exit code,
                 then the ctxgate /metrics scrapes before/after the gateway run and ctxgate's CPU
                 ticks (utime+stime) before/after it.
  rss.tsv        label, VmRSS kB, VmHWM kB samples of ctxgate's /proc/PID/status.
  metrics-final.txt  the last /metrics scrape.
Run metadata comes from LT_* environment variables.

Gateway-overhead quantiles come from ctxgate's own ctxgate_gateway_overhead_seconds histogram,
diffed between the scrapes around each gateway run, so each case only counts its own requests.
They are bucket-resolution estimates (linear interpolation inside the bucket, like Prometheus'
histogram_quantile): the buckets are 10µs, 25µs, 50µs, 100µs, 250µs, 500µs, 1ms, 2.5ms, ...
"""

import csv
import json
import os
import re
import sys

BUCKET_RE = re.compile(r'^(?P<name>[a-z_]+)_bucket\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$')
LABEL_RE = re.compile(r'(\w+)="([^"]*)"')
SAMPLE_RE = re.compile(r'^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$')


def env(name, default=''):
    return os.environ.get(name, default)


def load_json(path):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def metric(summary, name, stat):
    if not summary:
        return None
    m = summary.get('metrics', {}).get(name)
    if not m:
        return None
    return m.get('values', {}).get(stat)


def buckets(path, name, route='chat_completions'):
    """{le (float): cumulative count} for one histogram/route from a Prometheus text scrape."""
    out = {}
    try:
        with open(path, encoding='utf-8') as f:
            for line in f:
                m = BUCKET_RE.match(line.strip())
                if not m or m.group('name') != name:
                    continue
                labels = dict(LABEL_RE.findall(m.group('labels')))
                if labels.get('route') != route:
                    continue
                le = labels.get('le', '')
                out[float('inf') if le == '+Inf' else float(le)] = float(m.group('value'))
    except OSError:
        pass
    global FIRST_BOUND
    finite = [le for le in out if le != float('inf')]
    if finite:
        FIRST_BOUND = min(finite)
    return out


# The histogram's lowest bucket bound, read from the scrapes (ctxgate's buckets start at 10µs).
FIRST_BOUND = 0.00001


def samples(path):
    """[(name, {labels}, value)] of every sample line in a scrape."""
    out = []
    try:
        with open(path, encoding='utf-8') as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith('#'):
                    continue
                m = SAMPLE_RE.match(line)
                if m:
                    labels = dict(LABEL_RE.findall(m.group('labels') or ''))
                    out.append((m.group('name'), labels, float(m.group('value'))))
    except OSError:
        pass
    return out


def quantile(q, cumulative):
    """histogram_quantile over {le: cumulative count}; None if empty. A quantile landing in +Inf
    is reported as the largest finite bound (a lower bound on the truth)."""
    les = sorted(cumulative)
    if not les:
        return None
    total = cumulative[les[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le in les:
        count = cumulative[le]
        if count >= rank:
            if le == float('inf'):
                return prev_le
            in_bucket = count - prev_count
            if in_bucket <= 0:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / in_bucket
        prev_le, prev_count = le, count
    return les[-1]


def diff(after, before):
    return {le: after[le] - before.get(le, 0.0) for le in after}


def fmt_ms(v, signed=False):
    if v is None:
        return '–'
    return f'{v:+.3f}' if signed else f'{v:.3f}'


def fmt_hist_ms(v, first_bound=None):
    """A histogram quantile in ms; one inside the first bucket is only known to be below it."""
    first_bound = FIRST_BOUND if first_bound is None else first_bound
    if v is None:
        return '–'
    if v <= first_bound:
        return f'≤{first_bound * 1000:.3f}'
    return f'{v * 1000:.3f}'


def k6_status(rc):
    return {'0': 'pass', '99': 'FAIL (thresholds)'}.get(rc, f'error (exit {rc})')


def errors_of(summary):
    """'0' or 'N failed / M' for a run, plus failed checks."""
    if not summary:
        return 'no summary'
    reqs = metric(summary, 'http_reqs', 'count') or 0
    failed_rate = metric(summary, 'http_req_failed', 'rate') or 0
    failed = round(failed_rate * reqs)
    check_fails = metric(summary, 'checks', 'fails') or 0
    dropped = metric(summary, 'dropped_iterations', 'count') or 0
    parts = []
    if failed:
        parts.append(f'{failed} non-2xx/failed')
    if check_fails:
        parts.append(f'{int(check_fails)} failed checks')
    if dropped:
        parts.append(f'{int(dropped)} dropped')
    return ', '.join(parts) if parts else '0'


def main():
    work = sys.argv[1]
    clk_tck = float(env('LT_CLK_TCK', '100'))
    with open(os.path.join(work, 'cases.tsv'), encoding='utf-8') as f:
        cases = [dict(zip(
            ['id', 'mode', 'kind', 'rate', 'vus', 'duration',
             'direct_json', 'direct_rc', 'gw_json', 'gw_rc',
             'metrics_before', 'metrics_after', 'cpu_before', 'cpu_after'], row))
            for row in csv.reader(f, delimiter='\t') if row]
    rss = []
    rss_path = os.path.join(work, 'rss.tsv')
    if os.path.exists(rss_path):
        with open(rss_path, encoding='utf-8') as f:
            rss = [row for row in csv.reader(f, delimiter='\t') if row]

    for c in cases:
        c['d'] = load_json(c['direct_json'])
        c['g'] = load_json(c['gw_json'])
        before = buckets(c['metrics_before'], 'ctxgate_gateway_overhead_seconds')
        after = buckets(c['metrics_after'], 'ctxgate_gateway_overhead_seconds')
        h = diff(after, before)
        c['ovh_count'] = int(h.get(float('inf'), 0))
        c['ovh_p50'] = quantile(0.50, h)
        c['ovh_p99'] = quantile(0.99, h)
        g_reqs = metric(c['g'], 'http_reqs', 'count') or 0
        try:
            ticks = float(c['cpu_after']) - float(c['cpu_before'])
            c['cpu_us_per_req'] = ticks / clk_tck * 1e6 / g_reqs if g_reqs else None
        except ValueError:
            c['cpu_us_per_req'] = None

    quick = env('LT_QUICK') == '1'
    lines = []
    w = lines.append
    w(f"# ctxgate core load test — {env('LT_DATE')}{' (QUICK smoke run: short and low-rate, not for comparison)' if quick else ''}")
    w('')
    w(f"- Machine: {env('LT_NPROC')} cores ({env('LT_CPU')}), kernel {env('LT_KERNEL')}; "
      'k6, mock-upstream and ctxgate all share these cores (plus whatever else runs: load average '
      f"{env('LT_LOAD_START')} at start, {env('LT_LOAD_END')} at end).")
    w(f"- ctxgate {env('LT_GIT')}, release build of {env('LT_BIN_BUILT')}; k6 {env('LT_K6_VERSION')}; mock-upstream with "
      f"--latency {env('LT_MOCK_LATENCY')}ms --chunks {env('LT_MOCK_CHUNKS')} --chunk-delay {env('LT_MOCK_CHUNK_DELAY')}ms.")
    if env('LT_PIN') == '1':
        w('- PIN=1: k6 pinned to CPU 0, mock-upstream and ctxgate to CPU 1 (taskset).')
    w(f"- Each case runs k6 against the mock directly, then through ctxgate, back to back. "
      f"Rate cases: constant-arrival-rate for {env('LT_RATE_DURATION')}; max cases: closed loop, "
      f"{env('LT_MAX_VUS')} VUs for {env('LT_MAX_DURATION')}.")
    w('- Latencies in ms. "Added" = gateway percentile minus direct percentile (a difference of '
      'percentiles, not a percentile of differences). JSON rows use http_req_duration; stream rows '
      'show TTFB (k6 `timings.waiting`: request sent → first response byte) and, separately, the full '
      'stream duration.')
    w('- "ctxgate overhead" = p50/p99 of ctxgate\'s own `ctxgate_gateway_overhead_seconds` '
      '(time to response headers minus time waiting on the upstream), from the bucket counts added '
      'during that case only: **bucket resolution** (bounds 10µs, 25µs, 50µs, 100µs, 250µs, 500µs, 1ms, …; '
      'linear interpolation inside a bucket).')
    w('- "CPU/req" = ctxgate user+system CPU time during the gateway run divided by its requests '
      f"(clock-tick resolution, {1e3 / clk_tck:.0f} ms per tick).")
    w('')

    # Latency table.
    w('## Latency at fixed request rates')
    w('')
    w('| Case | Metric | Achieved req/s (direct / gateway) | Direct p50 | Direct p99 | Gateway p50 | Gateway p99 | **Added p50** | **Added p99** | ctxgate overhead p50 / p99 (hist) | ctxgate CPU/req (µs) | Errors (direct / gateway) | k6 thresholds (direct / gateway) |')
    w('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
    for c in [c for c in cases if c['kind'] == 'rate']:
        target = float(c['rate'])
        d_rate = metric(c['d'], 'http_reqs', 'rate')
        g_rate = metric(c['g'], 'http_reqs', 'rate')
        # Sustained: within 5% of the target rate, and under 1% of the iterations dropped.
        sustained = all(r is not None and r >= 0.95 * target for r in (d_rate, g_rate)) and not any(
            (metric(s, 'dropped_iterations', 'count') or 0) > 0.01 * (metric(s, 'http_reqs', 'count') or 0)
            for s in (c['d'], c['g']))
        c['sustained'] = sustained
        rates = f"{d_rate or 0:.0f} / {g_rate or 0:.0f}" + ('' if sustained else ' **(not sustained)**')
        rows = [('http_req_duration', 'duration')] if c['mode'] == 'json' else [
            ('ttfb', 'TTFB'), ('http_req_duration', 'full stream')]
        for i, (name, label) in enumerate(rows):
            d50, d99 = metric(c['d'], name, 'med'), metric(c['d'], name, 'p(99)')
            g50, g99 = metric(c['g'], name, 'med'), metric(c['g'], name, 'p(99)')
            a50 = g50 - d50 if None not in (g50, d50) else None
            a99 = g99 - d99 if None not in (g99, d99) else None
            c.setdefault('added', {})[label] = (a50, a99)
            first = i == 0
            case = f"{c['mode']} @ {c['rate']} req/s" if first else ''
            w(f"| {case} | {label} | {rates if first else ''} | {fmt_ms(d50)} | {fmt_ms(d99)} | "
              f"{fmt_ms(g50)} | {fmt_ms(g99)} | **{fmt_ms(a50, True)}** | **{fmt_ms(a99, True)}** | "
              + (f"{fmt_hist_ms(c['ovh_p50'])} / {fmt_hist_ms(c['ovh_p99'])} (n={c['ovh_count']})" if first else '')
              + ' | '
              + (f"{c['cpu_us_per_req']:.0f}" if first and c['cpu_us_per_req'] is not None else '')
              + ' | '
              + (f"{errors_of(c['d'])} / {errors_of(c['g'])}" if first else '')
              + ' | '
              + (f"{k6_status(c['direct_rc'])} / {k6_status(c['gw_rc'])}" if first else '')
              + ' |')
    w('')

    # Throughput table.
    w('## Max throughput (closed loop)')
    w('')
    w('| Case | VUs | Direct req/s | Gateway req/s | Gateway / direct | Direct p50 / p99 | Gateway p50 / p99 | ctxgate overhead p50 / p99 (hist) | ctxgate CPU/req (µs) | Errors (direct / gateway) | k6 thresholds (direct / gateway) |')
    w('|---|---|---|---|---|---|---|---|---|---|---|')
    for c in [c for c in cases if c['kind'] == 'max']:
        d_rate = metric(c['d'], 'http_reqs', 'rate')
        g_rate = metric(c['g'], 'http_reqs', 'rate')
        ratio = f'{g_rate / d_rate:.2f}' if d_rate and g_rate else '–'
        w(f"| {c['mode']} max | {c['vus']} | {d_rate or 0:.0f} | {g_rate or 0:.0f} | {ratio} | "
          f"{fmt_ms(metric(c['d'], 'http_req_duration', 'med'))} / {fmt_ms(metric(c['d'], 'http_req_duration', 'p(99)'))} | "
          f"{fmt_ms(metric(c['g'], 'http_req_duration', 'med'))} / {fmt_ms(metric(c['g'], 'http_req_duration', 'p(99)'))} | "
          f"{fmt_hist_ms(c['ovh_p50'])} / {fmt_hist_ms(c['ovh_p99'])} (n={c['ovh_count']}) | "
          + (f"{c['cpu_us_per_req']:.0f}" if c['cpu_us_per_req'] is not None else '–')
          + f" | {errors_of(c['d'])} / {errors_of(c['g'])} | {k6_status(c['direct_rc'])} / {k6_status(c['gw_rc'])} |")
    w('')

    # Memory.
    w('## ctxgate memory (/proc/PID/status)')
    w('')
    w('| When | VmRSS (MB) | VmHWM, peak RSS so far (MB) |')
    w('|---|---|---|')
    for label, vmrss, vmhwm in rss:
        w(f'| {label} | {int(vmrss) / 1024:.1f} | {int(vmhwm) / 1024:.1f} |')
    w('')

    # Counters at the end: non-200s, ctxgate errors, retries, aborts, in-flight leak check.
    final = samples(os.path.join(work, 'metrics-final.txt'))
    w('## ctxgate counters after all runs')
    w('')
    interesting = ('ctxgate_requests_total', 'ctxgate_errors_total', 'ctxgate_upstream_retries_total',
                   'ctxgate_upstream_failovers_total', 'ctxgate_upstream_stream_aborts_total',
                   'ctxgate_requests_in_flight')
    shown = False
    for name, labels, value in final:
        if name in interesting:
            lbl = ','.join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            note = ''
            if name == 'ctxgate_requests_in_flight':
                note = ' (counts the /metrics scrape itself, so 1 means nothing left in flight)'
            elif name == 'ctxgate_requests_total' and labels.get('status') not in ('200', None):
                note = ' **(non-200)**'
            w(f'- `{name}{{{lbl}}}` = {value:g}{note}')
            shown = True
    if not shown:
        w('- (no scrape)')
    w('')

    # Outside load.
    load_path = os.path.join(work, 'load.tsv')
    if os.path.exists(load_path):
        with open(load_path, encoding='utf-8') as f:
            load = [row for row in csv.reader(f, delimiter='\t') if len(row) == 3]
        busy = [row[0] for row in load if row[2] not in ('', '0')]
        w('## Other load on the machine')
        w('')
        w('1-minute load average at the end of each k6 run (the load test\'s own three processes '
          'are part of it): ' + ', '.join(f'{r[0]} {r[1]}' for r in load) + '.')
        w('')
        w('Runs that ended while a compiler or cargo was running (a concurrent build, which '
          'disturbs the numbers): ' + (', '.join(busy) if busy else 'none') + '.')
        w('')

    # Verdicts.
    w('## Targets')
    w('')
    hi_json = max((c for c in cases if c['kind'] == 'rate' and c['mode'] == 'json'),
                  key=lambda c: float(c['rate']), default=None)
    hi_stream = max((c for c in cases if c['kind'] == 'rate' and c['mode'] == 'stream'),
                    key=lambda c: float(c['rate']), default=None)

    def verdict(ok):
        return 'met' if ok else '**missed**'

    if hi_json and 'duration' in hi_json.get('added', {}):
        a50, a99 = hi_json['added']['duration']
        if a99 is not None:
            w(f"- Added p99 ≤ 1 ms, non-streamed @ {hi_json['rate']} req/s"
              f"{'' if hi_json.get('sustained') else ' (rate not sustained)'}: "
              f"{a99:+.3f} ms → {verdict(a99 <= 1.0)}"
              + ('' if a99 <= 1.0 else f' by {a99 - 1.0:.3f} ms')
              + f" (added p50 {a50:+.3f} ms; ctxgate's own overhead histogram p99 {fmt_hist_ms(hi_json['ovh_p99'])} ms, bucket resolution).")
    if hi_stream and 'TTFB' in hi_stream.get('added', {}):
        a50, a99 = hi_stream['added']['TTFB']
        if a99 is not None and a50 is not None:
            w(f"- Streaming TTFB added ≤ 1 ms @ {hi_stream['rate']} req/s"
              f"{'' if hi_stream.get('sustained') else ' (rate not sustained)'}: "
              f"p50 {a50:+.3f} ms → {verdict(a50 <= 1.0)}, p99 {a99:+.3f} ms → {verdict(a99 <= 1.0)}"
              + ('' if a99 <= 1.0 else f' by {a99 - 1.0:.3f} ms') + '.')
    if rss:
        peak = max(int(r[2]) for r in rss) / 1024
        w(f'- RSS < 50 MB: peak VmHWM {peak:.1f} MB → {verdict(peak < 50)}.')
    w('')
    w(f"Wall time of this run up to the report: {env('LT_WALL')} s.")
    sys.stdout.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
