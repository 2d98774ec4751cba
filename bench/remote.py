#!/usr/bin/env python3
"""bench/remote.py — what isolated and remote members cost, and how long their failover
stalls the application.

Per-call cost (p11bench, C, one process per run, rounds interleaved): C_GenerateRandom
(32 bytes) and ECDSA P-256 sign (C_SignInit + C_Sign), median latency with 1 thread and
throughput with 1 and 4 threads, for the same SoftHSM2 token reached

    direct            libsofthsm2.so itself
    rpc unix          p11-kit-client.so -> unix socket -> p11-kit server    (no hashim)
    rpc tls           p11-kit-client.so -> socat -> TLS over 127.0.0.1 -> socat -> p11-kit server
    hashim in-proc    the HA slot over one in-process member
    hashim isolated   the HA slot over one isolated member (hashim's own p11-kit server child)
    hashim remote     the HA slot over one remote member through the loopback TLS tunnel

Failover stall (python-pkcs11 application, 4 threads signing through the HA slot of a
two-member group; the other member is in-process SoftHSM2): the longest call while

    cut link          the remote member's TLS listener is killed (connections reset)
    stalled link      the remote member's p11-kit server is SIGSTOPped
    crashed isolated  the isolated member's module abort()s (emulated HSM, fault = crash)
    hung isolated     the isolated member's module blocks (emulated HSM, fault = hang)

with command_timeout 2 s, heartbeat_interval 0.5 s, recovery_interval 1 s.

    python3 bench/remote.py --quick     # CI smoke, about a minute
    python3 bench/remote.py             # 3 rounds
    python3 bench/remote.py --json out.json

Absolute numbers depend on the machine: read the ratios. Exit status 0 when everything
ran, 1 when some measurement failed, 2 when it cannot start.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests import softhsm  # noqa: E402
from tests.fixtures.build import build_emuhsm, write_control  # noqa: E402
from tests.netns import (FAST, P11KIT, P11KIT_CLIENT, PKI, Host, LocalEnd,  # noqa: E402
                         MemberSpec, Signer, domain_init, hashim_module, import_key,
                         make_signing_key, member_status, wait_for, write_config)

OPS = ("random32", "ecdsa")
STALL_MS = 50          # calls longer than this are recorded with their time


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def compile_p11bench(work: Path) -> Path:
    exe = work / "p11bench"
    argv = [os.environ.get("CC", "gcc"), "-O2", "-pthread", "-I/usr/include/p11-kit-1",
            str(HERE / "p11bench.c"), "-o", str(exe), "-ldl"]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        log(r.stderr)
        raise SystemExit(2)
    return exe


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HASHIM_") and k not in ("SOFTHSM2_CONF",
                                                        "P11_KIT_SERVER_ADDRESS")}
    env.update(extra)
    return env


def p11bench(exe: Path, module: str, env: dict, args: list[str], timeout=300) -> dict:
    r = subprocess.run([str(exe), module, *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    res = {"latency": {}, "throughput": {}, "errors": [], "rc": r.returncode,
           "stderr": r.stderr.strip().splitlines()[-5:]}
    for line in r.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "latency":
            res["latency"][rec["op"]] = rec
        elif rec.get("kind") == "throughput":
            res["throughput"][f"{rec['op']}/{rec['threads']}"] = rec
        elif rec.get("kind") == "error":
            res["errors"].append(rec)
    return res


# ---------------------------------------------------------------------------------------
class Bench:
    def __init__(self, work: Path, quick: bool):
        self.work, self.quick = work, quick
        self.module = hashim_module()
        self.exe = compile_p11bench(work)
        self.procs = []
        self.hosts = []

    def start(self, cmd, log_name, env=None):
        with open(self.work / log_name, "ab") as f:
            p = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=f,
                                 stderr=f, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def close(self):
        for h in self.hosts:
            h.close()
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- per-call cost ------------------------------------------------------------------
    def columns(self) -> list[tuple[str, str, dict]]:
        w = self.work
        tok = softhsm.make_token(w / "tokens", "bench")
        env_tok = base_env(**tok.env)
        r = p11bench(self.exe, tok.lib, env_tok, ["--setup-only", "--ops", "ecdsa"])
        if r["rc"] != 0:
            raise RuntimeError(f"key set-up failed: {r}")
        # p11-kit server on a unix socket, and a TLS tunnel to it over 127.0.0.1
        pki = PKI(w / "pki")
        host = Host(w, "bench-hsm", 1, tok, pki, use_netns=False)
        host.start()
        self.hosts.append(host)
        end = LocalEnd(w, host, pki)
        end.start()
        self.hosts.append(end)
        cols = [("direct", tok.lib, env_tok),
                ("rpc unix", P11KIT_CLIENT,
                 base_env(P11_KIT_SERVER_ADDRESS=f"unix:path={host.socket}")),
                ("rpc tls", P11KIT_CLIENT, base_env(P11_KIT_SERVER_ADDRESS=end.address))]
        for name, spec in (("hashim in-proc", MemberSpec("m", tok.lib, "bench", tok.env)),
                           ("hashim isolated", MemberSpec("m", tok.lib, "bench", tok.env,
                                                          isolate=True)),
                           ("hashim remote", MemberSpec("m", P11KIT_CLIENT, "bench",
                                                        {"P11_KIT_SERVER_ADDRESS":
                                                         end.address}))):
            d = w / name.replace(" ", "-")
            d.mkdir()
            conf = write_config(d / "hashim.toml", [spec], label="bench-ha",
                                state_dir=str(d / "state"), log=str(d / "ha.log"))
            if name == "hashim in-proc":
                domain_init(conf)
            cols.append((name, self.module, base_env(HASHIM_CONF=str(conf))))
        return cols

    def per_call(self, rounds: int, seconds: float, lat_seconds: float) -> dict:
        cols = self.columns()
        runs = {name: [] for name, _, _ in cols}
        args = ["--ops", ",".join(OPS), "--threads", "1,4", "--seconds", str(seconds),
                "--lat-seconds", str(lat_seconds), "--label-prefix", "p11bench"]
        for rnd in range(rounds):
            order = cols if rnd % 2 == 0 else list(reversed(cols))
            for name, module, env in order:
                log(f"  round {rnd + 1}/{rounds}: {name}")
                runs[name].append(p11bench(self.exe, module, env, args))
        return runs

    # -- failover stalls -----------------------------------------------------------------
    def stalls(self) -> list[dict]:
        w = self.work / "failover"
        w.mkdir()
        priv, pub = make_signing_key(w)
        plain = softhsm.make_token(w / "tokens", "plain")
        import_key(plain, priv)
        out = []
        pki = PKI(w / "pki")

        # a remote member behind a loopback TLS tunnel
        rtok = softhsm.make_token(w / "tokens", "far")
        import_key(rtok, priv)
        host = Host(w, "far-hsm", 2, rtok, pki, use_netns=False)
        host.start()
        self.hosts.append(host)
        end = LocalEnd(w, host, pki)
        end.start()
        self.hosts.append(end)
        # an isolated emulated HSM
        etok = softhsm.make_token(w / "tokens", "emu")
        import_key(etok, priv)
        lib = w / "libemuhsm.so"
        shutil.copyfile(build_emuhsm(w / ".emu"), lib)
        ctl = w / "emu.control"
        write_control(ctl)
        emu_env = dict(etok.env, EMUHSM_BACKEND=etok.lib, EMUHSM_CONTROL=str(ctl))

        def group(tag, first):
            d = w / tag
            d.mkdir()
            conf = write_config(d / "hashim.toml",
                                [first, MemberSpec("plain", plain.lib, "plain", plain.env)],
                                label="ha-stall", state_dir=str(d / "state"),
                                log=str(d / "ha.log"), **FAST)
            return d, conf

        remote = MemberSpec("far", P11KIT_CLIENT, "far", {"P11_KIT_SERVER_ADDRESS": end.address})
        iso = MemberSpec("emu", str(lib), "emu", emu_env, isolate=True)
        cases = [("cut link (TLS listener killed)", remote, host.kill_tunnel, host.start_tunnel),
                 ("stalled link (server SIGSTOPped)", remote, host.stall, host.resume),
                 ("crashed isolated member (abort)", iso,
                  lambda: write_control(ctl, fault="crash"), lambda: write_control(ctl)),
                 ("hung isolated member (blocks)", iso,
                  lambda: write_control(ctl, fault="hang"), lambda: write_control(ctl))]
        d = w / "domain"
        d.mkdir()
        domain_init(write_config(d / "hashim.toml", [remote, iso, MemberSpec(
            "plain", plain.lib, "plain", plain.env)], state_dir=str(d / "state")))
        for i, (what, first, fault, repair) in enumerate(cases):
            log(f"  failover: {what}")
            d, conf = group(f"case{i}", first)
            app = Signer.start(d / "app", conf, self.module, "ha-stall", pub, threads=4,
                               reopen=200, stall_ms=STALL_MS)
            rec = {"case": what, "member": first.name}
            try:
                app.wait_signing(300, timeout=60)
                time.sleep(0.5)
                before = app.stats()
                t0 = time.time()
                fault()
                wait_for(lambda: member_status(d / "state", app.pid, first.name)
                         .get("state") not in (None, "online"), 20, f"{first.name} failed")
                rec["failed_after_s"] = round(time.time() - t0, 2)
                app.wait_signing(300, timeout=30)
                time.sleep(1.0)
                st = app.stats()
                window = [ms for t, ms in st.get("stalls", []) if t >= t0 - 0.05]
                rec["longest_call_ms"] = max(window) if window else None
                rec["calls_over_50ms"] = len(window)
                rec["before_max_ms"] = round(before.get("max_ms", 0), 1)
                repair()
                t1 = time.time()
                wait_for(lambda: member_status(d / "state", app.pid, first.name)
                         .get("state") == "online", 30, f"{first.name} back")
                rec["back_after_repair_s"] = round(time.time() - t1, 2)
            except AssertionError as e:
                rec["error"] = str(e)
                repair()
            finally:
                r = app.finish()
            rec["errors"] = len(r["errors"])
            rec["signatures"] = r["ok"]
            out.append(rec)
        return out


# ---------------------------------------------------------------------------------------
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def report(runs: dict, stalls: list[dict], meta: dict) -> tuple[str, int]:
    lines, bad = [], 0
    P = lines.append
    P(f"machine   {meta['cpu']} ({meta['cores']} cores), {meta['kernel']}, "
      f"Python {meta['python']}, p11-kit {meta['p11kit']}, hashim {meta['commit']}")
    P(f"loadavg   {meta['load_start']} -> {meta['load_end']}")
    P("")
    names = list(runs)
    direct = runs["direct"]
    for op in OPS:
        P(f"{op}: median latency (1 thread) and throughput (1 / 4 threads)")
        P(f"  {'':18s} {'µs':>8s} {'x direct':>9s} {'+µs':>8s} {'1 thr/s':>9s} {'4 thr/s':>9s} {'4t %':>6s}")
        d_lat = med([r["latency"].get(op, {}).get("median_us") for r in direct])
        d_t4 = med([r["throughput"].get(f"{op}/4", {}).get("ops_per_s") for r in direct])
        for n in names:
            rs = runs[n]
            lat = med([r["latency"].get(op, {}).get("median_us") for r in rs])
            t1 = med([r["throughput"].get(f"{op}/1", {}).get("ops_per_s") for r in rs])
            t4 = med([r["throughput"].get(f"{op}/4", {}).get("ops_per_s") for r in rs])
            if lat is None:
                bad += 1
                P(f"  {n:18s} {'failed':>8s}  {rs[-1]['errors'][:1]} {rs[-1]['stderr'][-2:]}")
                continue
            ratio = lat / d_lat if d_lat else None
            P(f"  {n:18s} {lat:8.1f} {ratio:9.2f} {lat - d_lat:8.1f} {t1 or 0:9.0f} "
              f"{t4 or 0:9.0f} {100 * (t4 or 0) / d_t4 if d_t4 else 0:5.0f}%")
        P("")
    P("where a hop's cost shows: rpc unix - direct = p11-kit's RPC (a process switch and a "
      "socket round trip);")
    P("rpc tls - rpc unix = two socat relays and TLS; hashim X - rpc X = hashim's engine and "
      "its hand-off to a worker thread.")
    P("")
    if stalls:
        P("failover stall (4 threads signing, command_timeout 2 s, heartbeat 0.5 s, "
          "recovery_interval 1 s)")
        P(f"  {'':34s} {'failed after':>12s} {'longest call':>13s} {'calls>50ms':>11s} "
          f"{'errors':>6s} {'back after':>10s}")
        for s in stalls:
            if "error" in s:
                bad += 1
            lc = s.get("longest_call_ms")
            P(f"  {s['case']:34s} {s.get('failed_after_s', '-'):>11}s "
              f"{(str(lc) + ' ms') if lc is not None else '< 50 ms':>13s} "
              f"{s.get('calls_over_50ms', '-'):>11} {s.get('errors', '-'):>6} "
              f"{s.get('back_after_repair_s', '-'):>9}s" + (f"  ERROR {s['error']}" if "error" in s else ""))
            bad += 1 if s.get("errors") else 0
    return "\n".join(lines), bad


def machine() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    p11 = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "p11-kit"], capture_output=True,
                         text=True).stdout.strip() or "?"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "p11kit": p11, "commit": commit,
            "load_start": [round(x, 2) for x in os.getloadavg()]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke: 1 round, short runs")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="per throughput run")
    ap.add_argument("--no-failover", action="store_true", help="skip the stall measurements")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    if not shutil.which("p11-kit") or not os.path.exists(P11KIT_CLIENT) \
            or not shutil.which("socat") or not os.path.exists(softhsm.SOFTHSM_LIB):
        log("bench/remote.py needs p11-kit, p11-kit-modules, socat and softhsm2")
        return 2
    rounds = a.rounds or (1 if a.quick else 3)
    seconds = a.seconds or (0.5 if a.quick else 2.0)
    lat_seconds = 0.3 if a.quick else 1.0
    meta = machine()
    work = Path(tempfile.mkdtemp(prefix="hashim-bench-remote-"))
    b = None
    try:
        b = Bench(work, a.quick)
        log(f"bench/remote.py: work directory {work}")
        runs = b.per_call(rounds, seconds, lat_seconds)
        stalls = [] if a.no_failover else b.stalls()
    finally:
        if b is not None:
            b.close()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta["load_end"] = [round(x, 2) for x in os.getloadavg()]
    text, bad = report(runs, stalls, meta)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": meta, "runs": runs, "stalls": stalls},
                                           indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
