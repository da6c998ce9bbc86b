#!/usr/bin/env python3
"""Turns one pools.sh work directory into the markdown report (stdout).

Inputs, written by pools.sh into WORK:
  runs.tsv          round, target (direct|single|pool|affinity), k6 summary JSON path, k6 exit code
  load.tsv          round-target, 1-minute load average after the run
  metrics-start.txt, metrics-end.txt   ctxgate /metrics before the first and after the last round
  top.txt           the processes using the most CPU when the runs ended
Run metadata comes from LT_* environment variables.

The comparison is the median over rounds of each target's k6 http_req_duration p50 (and p90),
minus single's: what the pool code adds to a request on top of a plain upstream.
"""

import csv
import os
import statistics
import sys

from report import env, load_json, metric, samples

TARGETS = ['direct', 'single', 'pool', 'affinity']


def us(ms):
    return '–' if ms is None else f'{ms * 1000:.0f}'


def main():
    work = sys.argv[1]
    runs = {}
    codes = {}
    with open(os.path.join(work, 'runs.tsv'), encoding='utf-8') as f:
        for rnd, target, path, rc in csv.reader(f, delimiter='\t'):
            runs.setdefault(target, []).append((int(rnd), load_json(path)))
            codes.setdefault(target, []).append(int(rc))
    loads = {}
    try:
        with open(os.path.join(work, 'load.tsv'), encoding='utf-8') as f:
            for key, load in csv.reader(f, delimiter='\t'):
                loads[key] = load
    except OSError:
        pass

    quick = env('LT_QUICK') == '1'
    out = []
    out.append(f"# Pools: what choosing an endpoint costs, {env('LT_DATE')}{' (QUICK smoke)' if quick else ''}")
    out.append('')
    out.append(f"k6 {env('LT_K6_VERSION')} `chat.js` MODE={env('LT_MODE')}, {env('LT_RATE')} req/s for "
               f"{env('LT_DURATION')} per run, {env('LT_ROUNDS')} rounds, PREFIXES={env('LT_PREFIXES')}, "
               f"mock A, B, C in {'one mock-upstream process' if env('LT_MOCK_PROCS') == '1' else 'three mock-upstream processes'}; "
               f"ctxgate {env('LT_GIT')} (release, built {env('LT_BIN_BUILT')}); "
               f"{env('LT_NPROC')} CPUs ({env('LT_CPU')}), kernel {env('LT_KERNEL')}; "
               f"load average {env('LT_LOAD_START')} at start, {env('LT_LOAD_END')} at end; wall {env('LT_WALL')} s.")
    out.append('')
    out.append('Targets: `direct` = k6 to mock A; `single` = ctxgate → plain upstream (mock A); `pool` = ctxgate → '
               'pool of A, B, C (p2c over requests in flight); `affinity` = the same pool with prefix affinity '
               '(bounded-load rendezvous). One ctxgate process serves all three, routed by model.')
    out.append('')
    out.append('## Per run (k6 http_req_duration, µs)')
    out.append('')
    out.append('| round | target | p50 | p90 | p99 | requests | failed | k6 exit | load1 after |')
    out.append('|---|---|---|---|---|---|---|---|---|')
    for target in TARGETS:
        for (rnd, summary), rc in zip(runs.get(target, []), codes.get(target, [])):
            count = metric(summary, 'http_reqs', 'count')
            failed = metric(summary, 'http_req_failed', 'rate')
            out.append(f"| {rnd} | {target} | {us(metric(summary, 'http_req_duration', 'med'))} | "
                       f"{us(metric(summary, 'http_req_duration', 'p(90)'))} | {us(metric(summary, 'http_req_duration', 'p(99)'))} | "
                       f"{count if count is not None else '–'} | {'–' if failed is None else f'{failed * 100:.2f}%'} | {rc} | "
                       f"{loads.get(f'{rnd}-{target}', '–')} |")
    out.append('')

    def median_of(target, key):
        values = [metric(s, 'http_req_duration', key) for _, s in runs.get(target, [])]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    out.append('## Median over rounds (µs)')
    out.append('')
    out.append('| target | p50 | p90 | p50 vs single | p90 vs single |')
    out.append('|---|---|---|---|---|')
    base50, base90 = median_of('single', 'med'), median_of('single', 'p(90)')
    verdicts = []
    for target in TARGETS:
        p50, p90 = median_of(target, 'med'), median_of(target, 'p(90)')
        d50 = None if p50 is None or base50 is None else (p50 - base50)
        d90 = None if p90 is None or base90 is None else (p90 - base90)
        sign = lambda d: '–' if d is None else f'{d * 1000:+.0f}'
        out.append(f'| {target} | {us(p50)} | {us(p90)} | {sign(d50) if target != "single" else "0"} | '
                   f'{sign(d90) if target != "single" else "0"} |')
        if target in ('pool', 'affinity') and d50 is not None:
            verdicts.append((target, d50 * 1000))
    out.append('')
    budget = float(env('LT_TARGET_US', '50'))
    for target, d in verdicts:
        out.append(f"- {target}: p50 {d:+.0f} µs over single: {'within' if d <= budget else 'OVER'} the {budget:.0f} µs budget"
                   f"{' (a QUICK run is too short to judge)' if quick else ''}")
    out.append('')

    # Where the pools sent requests over the measured rounds.
    start = {(n, tuple(sorted(l.items()))): v for n, l, v in samples(os.path.join(work, 'metrics-start.txt'))}
    rows = []
    for name, labels, value in samples(os.path.join(work, 'metrics-end.txt')):
        if name != 'ctxgate_upstream_endpoint_requests_total':
            continue
        delta = value - start.get((name, tuple(sorted(labels.items()))), 0.0)
        if delta > 0:
            rows.append((labels['upstream'], labels['endpoint'], labels['choice'], int(delta)))
    if rows:
        out.append('## Requests per endpoint (measured rounds, from ctxgate_upstream_endpoint_requests_total)')
        out.append('')
        out.append('| upstream | endpoint | choice | requests |')
        out.append('|---|---|---|---|')
        for row in sorted(rows):
            out.append('| ' + ' | '.join(str(c) for c in row) + ' |')
        out.append('')
    try:
        with open(os.path.join(work, 'top.txt'), encoding='utf-8') as f:
            top = [l.strip() for l in f if l.strip()]
        out.append('Busiest processes when the runs ended (%CPU, command): ' + '; '.join(top) + '.')
        out.append('')
    except OSError:
        pass
    sys.stdout.write('\n'.join(out) + '\n')


if __name__ == '__main__':
    main()
