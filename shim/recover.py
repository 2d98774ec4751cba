"""``hashim recover NAME``: ask every running module to retry member NAME now.

The request is the file ``<state_dir>/recover-NAME`` (its mtime); each running module's
supervisor picks it up within a fraction of a second and starts a new round of recovery
attempts for that member (``recovery_attempts`` of them, every ``recovery_interval``), even
when it had given up. The command then waits (``--wait S``, default 30; 0: do not wait)
until every running process has taken the request and either brought the member back
online (exit 0) or failed its attempt (exit 1, with the reason).

Exit codes: 0 the member is online in every running process; 1 an attempt failed, the wait
ran out, or no module is running (the member is then probed directly and what was found is
printed); 2 unknown member or configuration error.
"""
from __future__ import annotations

import os
import sys
import time

from . import config as cfg
from .status import PROBE_TIMEOUT, live_processes, probe_member

WAIT = 30.0


def add_arguments(name, parser):
    if name != "recover":
        return
    parser.add_argument("--wait", type=float, default=WAIT, metavar="S",
                        help=f"wait up to S seconds for the outcome (default {WAIT:g}; "
                             "0: only ask)")


def request(state_dir: str, name: str) -> float:
    """Write the request file; returns its mtime (what the modules compare)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, f"recover-{name}")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    os.replace(tmp, path)
    return os.stat(path).st_mtime


def _member(view, name):
    return next((m for m in view.get("members", []) if m.get("name") == name), None)


def main(args) -> int:
    config = cfg.load(args.config_path, check_files=False)
    name = args.name
    if name not in config.member_names:
        return _fail(2, f"no member '{name}' in group '{config.group.label}' ({config.path}); "
                         f"members: {', '.join(config.member_names)}")
    sd = config.group.state_dir
    views = live_processes(sd)
    if not views:
        mc = config.member(name)
        found = probe_member(mc, os.path.join(sd, "lib"), PROBE_TIMEOUT)
        what = found["state"] + (f": {found['last_error']}" if found.get("last_error") else "")
        print(f"{name}: probed directly: {what}")
        return _fail(1, f"no running module uses {config.path}: there is nothing to "
                              f"recover member '{name}' in (probed directly, it is {what})")
    mtime = request(sd, name)
    pids = sorted(v["pid"] for v in views)
    print(f"asked {len(pids)} running process{'es' if len(pids) != 1 else ''} "
          f"(pid {', '.join(map(str, pids))}) to recover member '{name}'")
    sys.stdout.flush()
    wait = getattr(args, "wait", WAIT)
    if wait <= 0:
        return 0
    deadline = time.monotonic() + wait
    outcome = {}
    while True:
        views = {v["pid"]: v for v in live_processes(sd)}
        outcome = {pid: o for pid, o in outcome.items() if pid in views}
        pending = []
        for pid, v in views.items():
            if pid in outcome:
                continue
            taken = (v.get("recover_requests") or {}).get(name)
            m = _member(v, name)
            if m is None:
                outcome[pid] = ("failed", "the process does not run this member")
                continue
            if (taken is None or taken < mtime - 1e-6) and \
                    not (v.get("started_ts") or 0) > mtime:
                pending.append(pid)          # not taken yet
                continue
            # taken (or the process started after the request: its own view answers)
            if m["state"] == "online":
                outcome[pid] = ("online", None)
            elif m["state"] == "recovering":
                pending.append(pid)
            else:
                outcome[pid] = ("failed", m.get("last_error") or m["state"])
        if not pending:
            break
        if time.monotonic() > deadline:
            for pid in pending:
                outcome[pid] = ("timeout", None)
            break
        time.sleep(0.1)
    failed = []
    for pid, (what, why) in sorted(outcome.items()):
        if what == "online":
            print(f"pid {pid}: member '{name}' is online")
        elif what == "timeout":
            failed.append(f"pid {pid}: still recovering after {wait:g} s")
            print(failed[-1])
        else:
            failed.append(f"pid {pid}: {why}")
            print(f"pid {pid}: recovery failed: {why}")
    if not outcome:
        return _fail(1, "the running processes exited before answering")
    if failed:
        return _fail(1, f"recovering member '{name}' failed: " + "; ".join(failed))
    return 0



def _fail(code: int, msg: str) -> int:
    """One line on stderr naming what to fix; the exit code (1 failed, 2 usage/config)."""
    sys.stderr.write("hashim: " + " ".join(str(msg).split()) + "\n")
    sys.stderr.flush()
    return code
