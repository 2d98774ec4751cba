#!/usr/bin/env python3
"""What a member failure costs the application: stall, throughput dip, return.

Three emulated-HSM members (tests/fixtures/emuhsm.c over SoftHSM2, each its own library
copy and token) with a fixed service time (2 ms) and capacity 1 each, so the group's
capacity is known: 3 x 500 = 1500 signatures/s, 1000/s with a member out. 8 client
threads sign (ECDSA, single-part) through the HA slot as fast as they can (a Python
client, tests/test_failover.py's application process: python-pkcs11 releases the GIL in
each call; it records the start and duration of every command). After a steady phase,
member m1 fails, stays out for a while, is healed, and comes back by itself:

  hang          m1 stops answering, heartbeats included (HASHIM_SUPERVISE=thread:
                calls stuck in an in-process member can only be abandoned when a worker
                thread made them)
  errors        m1 answers CKR_DEVICE_ERROR to everything (default supervision:
                member calls on the application's threads)
  errors/thread the same with HASHIM_SUPERVISE=thread

Measured, per scenario (median over --rounds):

  detect        failure injected -> hashim marks the member failed (HA log transition)
  stall         the commands in flight when hashim failed the member that the failure
                held up (took > 10 x the steady median): how many, median and worst
                duration; for errors, the worst duration of any command that started in
                the second after the failure
  p99 / max     latency of the commands started in the 2 s after the failure (steady p99)
  dip           throughput in the worst 250 ms window after the failure, % of steady;
                "out" = throughput while the member is out, % of steady
  back          fault healed -> member online again (recovery attempts come every
                recovery_interval = 1 s here), and online -> its first served command
  after         each member's share of the signatures in the 1.5 s after m1's return
                (33/33/33 when it is fully back in rotation)

Settings are the tests' short ones: command_timeout 2 s, heartbeat_interval 0.5 s,
recovery_interval 1 s, recovery_attempts unlimited (the hang stall scales with
command_timeout: 20 s by default).

    python3 bench/failover.py --quick     # 1 round (about 40 s)
    python3 bench/failover.py             # 3 rounds (about 2 minutes)
    python3 bench/failover.py --json out.json
Exit status: 0 ran, 1 a scenario failed to run; targets are not judged here.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.build import build_emuhsm  # noqa: E402
from tests.test_failover import HANG_ALL, Cluster  # noqa: E402

SERVICE_MS = 2
THREADS = 8
STEADY = 3.0          # seconds of steady load before the failure
OUT = 2.5             # seconds the member stays faulty once failed
AFTER = 2.0           # seconds of load after it is back

SCENARIOS = {
    "hang": ("thread", dict(fault="hang", fault_functions=HANG_ALL)),
    "errors": (None, dict(fault="device_error")),
    "errors/thread": ("thread", dict(fault="device_error")),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))]


def transition_time(c, name, state, after):
    m = c.member_status(name)
    ts = [t["ts"] for t in m.get("transitions", []) if t["state"] == state and t["ts"] >= after]
    return min(ts) if ts else None


def run_one(emu, base: Path, scenario: str) -> dict:
    supervise, fault = SCENARIOS[scenario]
    healthy = dict(service_ms=SERVICE_MS, capacity=1)
    c = Cluster(base, emu, recovery_attempts="unlimited")
    try:
        for n in c.names:
            c.ctl(n, **healthy)
        a = c.app(supervise)
        a("open")
        a("keys")
        a("watch_start", name="m1")
        a("load_start", threads=THREADS, mix=("sign",), record_all=True)
        time.sleep(STEADY)
        t_fail = time.time()
        c.ctl("m1", **healthy, **fault)
        c.wait_state("m1", ("device error", "token not present", "recovering"), timeout=20)
        t_detect = transition_time(c, "m1", "device error", t_fail - 1) or time.time()
        time.sleep(OUT)
        t_heal = time.time()
        c.ctl("m1", **healthy)
        c.wait_state("m1", "online", timeout=20)
        time.sleep(0.5)
        s0 = {n: c.wait_stats(n, lambda st: True).get("C_Sign", 0) for n in c.names}
        time.sleep(AFTER - 0.5)
        s1 = {n: c.stats(n).get("C_Sign", 0) for n in c.names}
        res = a("load_stop")
        cycles = a("watch_stop")["cycles"]
        a.close()
    finally:
        c.close()
    ops = res["all"]
    errors = res["errors"]
    steady = [d for t0, d, op, ok in ops if t_fail - STEADY + 0.5 <= t0 < t_fail]
    med = statistics.median(steady)
    in_flight = [d for t0, d, op, ok in ops if t0 <= t_detect <= t0 + d]
    stalled = [d for d in in_flight if d > 10 * med]
    after = [d for t0, d, op, ok in ops if t_fail <= t0 < t_fail + 2.0]
    first_second = [d for t0, d, op, ok in ops if t_fail <= t0 < t_fail + 1.0]
    # throughput: completions per 250 ms window
    ends = sorted(t0 + d for t0, d, op, ok in ops)
    steady_rate = sum(1 for e in ends if t_fail - STEADY + 0.5 <= e < t_fail) / (STEADY - 0.5)
    worst = None
    w = t_fail
    while w < t_fail + 3.0:
        n = sum(1 for e in ends if w <= e < w + 0.25) / 0.25
        worst = n if worst is None else min(worst, n)
        w += 0.05
    # the return after the heal (a hung member may be restarted, and fail again, while
    # it is still hung: those cycles are not its return)
    back_online = next((cy for cy in cycles if cy.get("online") and cy["online"] >= t_heal),
                       {})
    out_rate = sum(1 for e in ends if t_detect + 0.5 <= e < t_heal) / max(0.1, t_heal - t_detect - 0.5)
    return {
        "scenario": scenario, "supervise": supervise or "auto",
        "ops": len(ops), "errors": len(errors),
        "error_kinds": sorted({e[2] for e in errors}),
        "steady_median_ms": med * 1000, "steady_p99_ms": pct(steady, 99) * 1000,
        "steady_rate": steady_rate,
        "detect_s": t_detect - t_fail,
        "stalled": len(stalled),
        "stall_median_s": statistics.median(stalled) if stalled else None,
        "stall_worst_s": max(stalled) if stalled else None,
        "first_second_worst_ms": max(first_second) * 1000 if first_second else None,
        "after_p99_ms": pct(after, 99) * 1000 if after else None,
        "after_max_ms": max(after) * 1000 if after else None,
        "dip_pct": 100 * worst / steady_rate if steady_rate else None,
        "out_pct": 100 * out_rate / steady_rate if steady_rate else None,
        "share_after_pct": {n: 100.0 * (s1[n] - s0[n]) / max(1, sum(s1[k] - s0[k] for k in s1))
                            for n in s1},
        "heal_to_online_s": (back_online.get("online") - t_heal)
        if back_online.get("online") else None,
        "online_to_first_ms": (back_online["first_served"] - back_online["online"]) * 1000
        if back_online.get("first_served") and back_online.get("online") else None,
    }


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="failover benchmark (stall, dip, return)")
    ap.add_argument("--quick", action="store_true", help="1 round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"subset of {','.join(SCENARIOS)}")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--module", metavar="PATH", help="hashim module (default: HASHIM_MODULE "
                    "or shim.module_path())")
    args = ap.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    if args.module:
        os.environ["HASHIM_MODULE"] = args.module
    names = [s for s in args.scenarios.split(",") if s]
    for s in names:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    tmp = Path(tempfile.mkdtemp(prefix="hashim-failover-bench-"))
    emu = build_emuhsm(tmp / "emu")
    runs, failed = {s: [] for s in names}, []
    for r in range(rounds):
        for s in (names if r % 2 == 0 else names[::-1]):
            log(f"round {r + 1}/{rounds}: {s}")
            try:
                runs[s].append(run_one(emu, tmp / f"r{r}-{s.replace('/', '-')}", s))
            except Exception as e:  # noqa: BLE001 - reported, the others go on
                failed.append(f"{s} (round {r + 1}): {type(e).__name__}: {e}"[:300])
                log(failed[-1])

    def med(s, k):
        vals = [x[k] for x in runs[s] if x.get(k) is not None]
        return statistics.median(vals) if vals else None
    print(f"failover: 3 emulated HSMs ({SERVICE_MS} ms, capacity 1: 1500 signatures/s), "
          f"{THREADS} client threads, command_timeout 2 s, heartbeat 0.5 s, recovery "
          f"every 1 s; medians over {rounds} round(s)")
    head = ("scenario", "errors", "detect s", "stalled", "stall med s", "stall worst s",
            "1st-s worst ms", "p99 ms (steady)", "max ms", "dip %", "out %",
            "heal->online s", "online->1st ms", "after: m0/m1/m2 %")
    rows = []
    for s in names:
        if not runs[s]:
            rows.append((s,) + ("failed",) + ("",) * (len(head) - 2))
            continue
        rows.append((
            s, str(sum(x["errors"] for x in runs[s])), fmt(med(s, "detect_s"), ".2f"),
            fmt(med(s, "stalled"), ".0f"), fmt(med(s, "stall_median_s"), ".2f"),
            fmt(max((x["stall_worst_s"] or 0) for x in runs[s]) or None, ".2f"),
            fmt(med(s, "first_second_worst_ms"), ".1f"),
            f"{fmt(med(s, 'after_p99_ms'), '.1f')} ({fmt(med(s, 'steady_p99_ms'), '.1f')})",
            fmt(med(s, "after_max_ms"), ".0f"), fmt(med(s, "dip_pct"), ".0f"),
            fmt(med(s, "out_pct"), ".0f"), fmt(med(s, "heal_to_online_s"), ".2f"),
            fmt(med(s, "online_to_first_ms"), ".1f"),
            "/".join(fmt(statistics.median(x["share_after_pct"][n] for x in runs[s]), ".0f")
                     for n in ("m0", "m1", "m2"))))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    for s in names:
        for x in runs[s]:
            print(f"  {s}: {x['ops']} commands, steady {x['steady_rate']:.0f}/s, median "
                  f"{x['steady_median_ms']:.2f} ms; errors {x['errors']} {x['error_kinds']}")
    if failed:
        print("failed: " + "; ".join(failed))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "failed": failed}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
