"""``hashim status [--json] [--watch]``: the group's members as the running modules see them.

Every process that has the module initialised publishes its view in the state directory of
the config (``[group] state_dir``; see shim/engine/status.py); this command merges the views
of every live process (files of dead processes are ignored and removed). With no module
running it loads each member's module itself, in a child process per member (private
instance and env honoured, killed after ``--probe-timeout`` seconds), looks for the token,
and reports what it found (``processes: 0``).

Output (``--json``): one JSON object; with ``--watch``, one object per line every
``--interval`` seconds (JSON Lines) until interrupted.

``group``
    the HA slot's token label (``[group] label``).
``primary``
    the member that receives key management (the first online member in configured order),
    as most processes see it; null when no member is online.
``processes``
    number of live processes running the module with this config (0: the members were
    probed directly by this command).
``pids``
    their process ids.
``stale_pids``
    those whose view was last written more than 30 s ago (a running module rewrites it at
    least every 5 s: its supervisor thread is stuck, its view may be out of date).
``members``
    one object per member, in configured order (then members that a process still runs
    but the config no longer lists, with ``"configured": false``):

    ``name``
        the member's name.
    ``state``
        ``online``; ``device error`` (has just failed: out of rotation, first recovery
        attempt pending); ``token not present`` (failed, between recovery attempts);
        ``recovering`` (an attempt is running); ``given up`` (attempts exhausted; ``hashim
        recover NAME`` starts a new round). Processes that disagree are merged to the
        worst state, in the order online < recovering < device error < token not present <
        given up; ``by_process`` has each one's.
    ``in_flight``
        commands running on the member now (sum over processes).
    ``served``
        commands the member answered since each process started (sum).
    ``failed_over``
        commands the member failed that were re-run on another member (sum).
    ``recovery``
        null while online; else ``{"attempt": k, "of": n, "next_in_s": s}``: k recovery
        attempts made since the failure (or since ``hashim recover``), n the configured
        ``recovery_attempts`` (null: unlimited), s seconds to the next attempt (0 while one
        runs, null when given up). Merged: highest k, soonest s.
    ``last_error``
        the last failure reason (a return code name and what was being done; never a PIN or
        key material), from the process that saw the latest change; null if none.
    ``last_change``
        UTC time of the member's last state change (ISO 8601, ``...Z``), latest over the
        processes; ``last_change_ts`` the same in seconds since the epoch.
    ``kind``
        ``in process``, ``isolated`` or ``remote``; ``module`` the module's path.
    ``by_process``
        ``{"<pid>": state}`` (absent with ``processes: 0``).
    ``transitions``
        the latest state changes, oldest first, over all processes:
        ``{"at": iso, "ts": seconds, "state": s, "reason": text or null, "pid": pid}``.
    ``endpoints``
        per process, an isolated member's p11-kit server child (``pid``, ``address``)
        or a remote member's ``address``; empty for in-process members
    ``heartbeat_rtt_ms``
        the slowest last heartbeat round trip over the processes (null: none yet).
    ``probed``
        true when this command loaded the member itself (``processes: 0``).
``state_dir``
    where the views were read.
``updated``
    when this object was made (UTC, ISO 8601).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

from . import config as cfg

SEVERITY = {"online": 0, "recovering": 1, "device error": 2, "token not present": 3,
            "given up": 4}
PROBE_TIMEOUT = 10.0
STALE_AFTER = 30.0      # a live process's view older than this: its supervisor is stuck
BAR = 30                                    # width of the served-commands bar


def add_arguments(name, parser):
    if name != "status":
        return
    parser.add_argument("--interval", type=float, default=1.0, metavar="S",
                        help="seconds between two refreshes with --watch (default 1)")
    parser.add_argument("--probe-timeout", type=float, default=PROBE_TIMEOUT, metavar="S",
                        help="with no module running, give each member this long to answer "
                             f"a direct probe (default {PROBE_TIMEOUT:g})")
    parser.add_argument("--no-probe", action="store_true",
                        help="with no module running, do not load the members' modules")


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --------------------------------------------------------------------------- processes

def _alive(pid: int, start) -> bool:
    from .engine.status import process_start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        if data[data.rindex(b")") + 2:][:1] in (b"Z", b"X"):
            return False                    # exited, not yet reaped
    except (OSError, ValueError):
        pass
    if start is not None:
        now = process_start(pid)
        if now is not None and now != start:
            return False                    # the pid was reused by another process
    return True


def live_processes(state_dir: str, clean: bool = True) -> list[dict]:
    """The status files of live processes (dead processes' files removed if ``clean``)."""
    try:
        names = sorted(os.listdir(state_dir))
    except OSError:
        return []
    out = []
    for n in names:
        if not (n.startswith("status-") and n.endswith(".json")):
            continue
        path = os.path.join(state_dir, n)
        try:
            pid = int(n[len("status-"):-len(".json")])
        except ValueError:
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = None
        if data is not None and not isinstance(data, dict):
            data = None
        start = data.get("pid_start") if data else None
        if not _alive(pid, start):
            if clean:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            continue
        if data is None or not isinstance(data.get("members"), list):
            continue                        # being written, or not ours
        data["pid"] = pid
        out.append(data)
    return out


# --------------------------------------------------------------------------- probing

def probe_member(mc, cache_dir: str, timeout: float = PROBE_TIMEOUT) -> dict:
    """Load one member's module in a child process and look for its token:
    ``{"state": "online" | "token not present", "last_error": reason or None}``."""
    req = json.dumps({"name": mc.name, "module": mc.module, "token_label": mc.token_label,
                      "token_serial": mc.token_serial,
                      "private_instance": mc.private_instance, "env": dict(mc.env or {}),
                      "isolate": mc.isolate, "cache_dir": cache_dir})
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("HASHIM_PIN", "HASHIM_SO_PIN"):
        env.pop(k, None)
    try:
        r = subprocess.run([sys.executable, "-c", "import shim.status as s; s._probe_child()"],
                           input=req.encode(), capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"state": "token not present",
                "last_error": f"no answer from {mc.module} within {timeout:g} s (hung?)"}
    if r.returncode != 0:
        how = (f"killed by signal {-r.returncode}" if r.returncode < 0
               else f"exit status {r.returncode}")
        return {"state": "token not present",
                "last_error": f"the module {mc.module} crashed while probed ({how})"}
    try:
        return json.loads(r.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"state": "token not present", "last_error": f"probing {mc.module} gave no answer"}


def _probe_child() -> None:
    """Child side of probe_member: request on stdin, one JSON object on stdout."""
    from .errors import P11Error
    from .members.module import Module, ffi, private_copy
    from .spec.constants import CKF_SERIAL_SESSION, CKR_OK
    req = json.loads(sys.stdin.read())
    out = {"state": "token not present", "last_error": None}
    mod = None
    try:
        path = req["module"]
        if req["private_instance"]:
            path = private_copy(path, req["name"], req["cache_dir"])
        mod = Module(req["name"], path, req["env"])
        mod.initialize()
        slot = mod.find_slot(req["token_label"], req["token_serial"])
        h = ffi.new("CK_SESSION_HANDLE *")
        rv = mod.f["C_OpenSession"](slot, CKF_SERIAL_SESSION, ffi.NULL, ffi.NULL, h)
        if rv != CKR_OK:
            raise P11Error(rv, f"member '{req['name']}': C_OpenSession failed")
        info = ffi.new("CK_SESSION_INFO *")
        rv = mod.f["C_GetSessionInfo"](h[0], info)
        if rv != CKR_OK:
            raise P11Error(rv, f"member '{req['name']}': C_GetSessionInfo failed")
        mod.f["C_CloseSession"](h[0])
        out = {"state": "online", "last_error": None}
    except P11Error as e:
        out["last_error"] = str(e.reason or e) + (f" ({_rv(e.rv)})" if e.reason else "")
    except Exception as e:  # noqa: BLE001 - reported, not raised
        out["last_error"] = f"{type(e).__name__}: {e}"
    finally:
        if mod is not None:
            try:
                mod.finalize()
            except Exception:  # noqa: BLE001
                pass
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


def _rv(rv: int) -> str:
    from .errors import rv_name
    return rv_name(rv)


def probe_all(config, timeout: float = PROBE_TIMEOUT) -> dict:
    """``processes: 0`` status: every member probed directly (in parallel)."""
    import concurrent.futures as cf
    cache = os.path.join(config.group.state_dir, "lib")
    with cf.ThreadPoolExecutor(max_workers=max(1, len(config.members))) as ex:
        found = list(ex.map(lambda mc: probe_member(mc, cache, timeout), config.members))
    now = time.time()
    members = []
    for mc, f in zip(config.members, found):
        members.append({
            "name": mc.name, "state": f.get("state", "token not present"), "in_flight": 0,
            "served": 0, "failed_over": 0, "recovery": None,
            "last_error": f.get("last_error"), "last_change": iso(now), "last_change_ts": now,
            "kind": _kind(mc), "module": mc.module, "transitions": [],
            "heartbeat_rtt_ms": None, "probed": True})
    primary = next((m["name"] for m in members if m["state"] == "online"), None)
    return {"group": config.group.label, "primary": primary, "processes": 0, "pids": [],
            "stale_pids": [], "members": members, "state_dir": config.group.state_dir, "updated": iso(now)}


def _kind(mc) -> str:
    if mc.isolate:
        return "isolated"
    if "P11_KIT_SERVER_ADDRESS" in (mc.env or {}):
        return "remote"
    return "in process"


# --------------------------------------------------------------------------- merging

def merge(config, views: list[dict]) -> dict:
    """One status from the views of the live processes (see the module docstring)."""
    names = list(config.member_names)
    for v in views:
        for m in v["members"]:
            if m.get("name") not in names:
                names.append(m.get("name"))
    limit = config.group.recovery_attempts
    members = []
    for name in names:
        seen = [(v["pid"], m) for v in views for m in v["members"] if m.get("name") == name]
        mc = next((c for c in config.members if c.name == name), None)
        if not seen:
            members.append({"name": name, "state": "token not present", "in_flight": 0,
                            "served": 0, "failed_over": 0, "recovery": None,
                            "last_error": "not loaded by any running process (added to the "
                                          "config after they started?)",
                            "last_change": None, "last_change_ts": None,
                            "kind": _kind(mc) if mc else None,
                            "module": mc.module if mc else None, "by_process": {},
                            "transitions": [], "heartbeat_rtt_ms": None})
            continue
        state = max((m.get("state", "token not present") for _, m in seen),
                    key=lambda s: SEVERITY.get(s, 3))
        recs = [m["recovery"] for _, m in seen if m.get("recovery")]
        rec = None
        if recs:
            nexts = [r.get("next_in_s") for r in recs if r.get("next_in_s") is not None]
            rec = {"attempt": max(r.get("attempt", 0) for r in recs),
                   "of": recs[0].get("of", limit),
                   "next_in_s": min(nexts) if nexts else None}
        latest = max(seen, key=lambda pm: pm[1].get("last_change_ts") or 0)[1]
        with_error = [m for _, m in seen if m.get("last_error")]
        last_error = (max(with_error, key=lambda m: m.get("last_change_ts") or 0)["last_error"]
                      if with_error else None)
        trans = sorted(({**t, "pid": pid} for pid, m in seen for t in m.get("transitions") or []),
                       key=lambda t: t.get("ts") or 0)[-32:]
        rtts = [m.get("heartbeat_rtt_ms") for _, m in seen if m.get("heartbeat_rtt_ms") is not None]
        entry = {
            "name": name, "state": state,
            "in_flight": sum(int(m.get("in_flight") or 0) for _, m in seen),
            "served": sum(int(m.get("served") or 0) for _, m in seen),
            "failed_over": sum(int(m.get("failed_over") or 0) for _, m in seen),
            "recovery": rec if state != "online" else None,
            "last_error": last_error,
            "last_change": latest.get("last_change"),
            "last_change_ts": latest.get("last_change_ts"),
            "kind": latest.get("kind"), "module": latest.get("module"),
            "endpoints": {str(pid): m["endpoint"] for pid, m in seen if m.get("endpoint")},
            "by_process": {str(pid): m.get("state") for pid, m in seen},
            "transitions": trans,
            "heartbeat_rtt_ms": max(rtts) if rtts else None,
        }
        if mc is None:
            entry["configured"] = False
        members.append(entry)
    votes = Counter(v.get("primary") for v in views if v.get("primary"))
    primary = None
    if votes:
        best = max(votes.values())
        order = {n: i for i, n in enumerate(names)}
        primary = min((p for p, c in votes.items() if c == best),
                      key=lambda p: order.get(p, len(order)))
    now = time.time()
    stale = sorted(v["pid"] for v in views
                   if (v.get("updated_ts") or now) < now - STALE_AFTER)
    return {"group": config.group.label, "primary": primary, "processes": len(views),
            "pids": sorted(v["pid"] for v in views), "stale_pids": stale, "members": members,
            "state_dir": config.group.state_dir, "updated": iso(now)}


def collect(config, probe: bool = True, timeout: float = PROBE_TIMEOUT) -> dict:
    views = live_processes(config.group.state_dir)
    if views:
        return merge(config, views)
    if probe:
        return probe_all(config, timeout)
    st = merge(config, [])
    for m in st["members"]:
        m["state"] = "unknown"
        m["last_error"] = "no module running; not probed (--no-probe)"
    return st


# --------------------------------------------------------------------------- table

def _ago(ts, now) -> str:
    if not ts:
        return "-"
    d = max(0, now - ts)
    if d < 60:
        when = f"{d:.0f} s ago"
    elif d < 3600:
        when = f"{d / 60:.0f} min ago"
    elif d < 86400:
        when = f"{d / 3600:.1f} h ago"
    else:
        when = f"{d / 86400:.1f} d ago"
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f" ({when})"


def _recovery_text(r) -> str:
    if not r:
        return "-"
    of = "unlimited" if r.get("of") is None else r["of"]
    text = f"attempt {r.get('attempt', 0)}/{of}"
    if r.get("next_in_s") is None:
        return text + ", stopped"
    if r["next_in_s"] == 0:
        return text + ", running"
    return text + f", next in {r['next_in_s']:.1f} s"


def render(st: dict) -> str:
    now = time.time()
    lines = []
    src = (f"{st['processes']} process{'es' if st['processes'] != 1 else ''} "
           f"(pid {', '.join(map(str, st['pids']))})" if st["processes"]
           else "0 processes: no module running, members probed directly")
    lines.append(f"group '{st['group']}'   primary: {st['primary'] or '(none: no member online)'}"
                 f"   {src}")
    heads = ["MEMBER", "STATE", "KIND", "IN FLIGHT", "SERVED", "FAILED OVER", "RECOVERY",
             "LAST ERROR", "LAST CHANGE"]
    rows = []
    for m in st["members"]:
        err = m.get("last_error") or "-"
        if len(err) > 60:
            err = err[:57] + "..."
        name = m["name"] + (" *" if m["name"] == st["primary"] else "")
        rows.append([name, m["state"], m.get("kind") or "-", str(m["in_flight"]),
                     str(m["served"]), str(m["failed_over"]), _recovery_text(m.get("recovery")),
                     err, _ago(m.get("last_change_ts"), now)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(heads)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    lines.append(fmt(heads))
    lines += [fmt(r) for r in rows]
    lines.append("(* primary)")
    if st.get("stale_pids"):
        lines.append(f"warning: no update for more than {STALE_AFTER:g} s from pid "
                     f"{', '.join(map(str, st['stale_pids']))}: its view may be out of date")
    total = max([m["served"] for m in st["members"]] + [0])
    if st["processes"]:
        lines.append("")
        lines.append("commands served")
        nw = max(len(m["name"]) for m in st["members"]) if st["members"] else 0
        for m in st["members"]:
            n = int(round(BAR * m["served"] / total)) if total else 0
            lines.append(f"  {m['name'].ljust(nw)}  {'#' * n}{'.' * (BAR - n)}  {m['served']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def main(args) -> int:
    config = cfg.load(args.config_path, check_files=False)
    probe = not getattr(args, "no_probe", False)
    timeout = getattr(args, "probe_timeout", PROBE_TIMEOUT)
    if not args.watch:
        st = collect(config, probe, timeout)
        print(json.dumps(st, indent=2) if args.json else render(st))
        return 0
    interval = max(0.1, getattr(args, "interval", 1.0))
    tty = sys.stdout.isatty()
    try:
        while True:
            t0 = time.monotonic()
            st = collect(config, probe, timeout)
            if args.json:
                sys.stdout.write(json.dumps(st) + "\n")
            elif tty:
                sys.stdout.write("\x1b[H\x1b[2J" + render(st) + "\n"
                                 + f"\nrefreshing every {interval:g} s; Ctrl-C to stop\n")
            else:
                sys.stdout.write(render(st) + "\n\n")
            sys.stdout.flush()
            time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    except KeyboardInterrupt:
        return 0
