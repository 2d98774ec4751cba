"""``hashim group synchronize --now``: copy what is missing to every member, now.

The command builds the engine's own group in the CLI process (``shim.engine.group.Group``,
without its supervisor, config watcher or status publishing: it is not a running module and
does not show up in ``hashim status``), starts every configured member, logs in to each one
with the user PIN (``--pin-file FILE``, else ``$HASHIM_PIN``, else a prompt on a terminal;
the primary first: a PIN it refuses is tried on no other token, so a wrong PIN cannot lock
several tokens), and runs the engine's synchronisation (``Replicator.sync``):

* an object held by one member and missing on another is copied there (secret and private
  keys wrapped under the group's domain key, as the running modules do);
* an object destroyed through the HA slot while a member was away (a tombstone on the other
  members) is destroyed on that member;
* ``synchronize = false`` in the config does not stop it: ``--now`` is the operator asking.

Then every member's token objects are listed again and whatever is still missing somewhere
is reported with the reason (a member without the domain key, a key that is not extractable
under it, a member that refused the copy, ...).

Output (stdout), one line per change and per problem, then a summary line::

    copied private key 'k2' to ha-b
    copied 2 hashim records (tombstones) to ha-c
    destroyed secret key 'old' on ha-c (it was destroyed through the HA slot while ha-c was away)
    not copied: secret key 'raw' (held by ha-a) to ha-b: not wrappable under the domain key (...)
    member 'ha-d' not synchronised: no token with label 'ha-d' in ... (CKR_TOKEN_NOT_PRESENT)
    synchronised group 'payments-ha': 3 of 4 members (ha-a, ha-b, ha-c), 1 copied, 1 destroyed, 1 not copied

(hashim records are the group's own bookkeeping objects -- tombstones of destroyed objects,
the intents of non-extractable keys -- and are not counted as copied objects.)

Exit status: 0 when every configured member holds every object afterwards; 1 when something
could not be copied, a member could not be reached or refused the PIN; 2 for a usage or
configuration error (no PIN, an unreadable --pin-file, a broken config file).

The run is also written to the HA log (``[group] log``), as the running modules write their
own synchronisations, so ``hashim log`` shows it.  The PIN is never printed or logged.

Running modules are not disturbed: they keep their sessions; a key copied here is found by
them on the member that received it when they next look for it there.
"""
from __future__ import annotations

import dataclasses
import logging
import sys

from . import config as cfg
from .errors import P11Error, rv_name

log = logging.getLogger("hashim")

PIN_ENV = "HASHIM_PIN"


class Usage(Exception):
    """Exit 2."""


class Failed(Exception):
    """Exit 1."""


class _Collect(logging.Handler):
    """Keeps the engine's warnings and errors of this run (reasons to report)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        try:
            self.messages.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a bad record must not stop the sync
            pass


def _not_transitions(record) -> bool:
    """Members started and stopped by this command are not the group's members changing
    state: keep them out of the HA log."""
    return not (isinstance(record.msg, str) and record.msg.startswith("member '%s': %s -> "))


def _setup_logging(config) -> _Collect:
    """The HA log file (as the module writes it) and a collector; nothing on stderr (this
    command reports on stdout/stderr itself)."""
    try:
        from .logs import setup_logging
        setup_logging(config)
    except Exception:  # noqa: BLE001 - the HA log is a convenience here
        log.setLevel(logging.INFO)
        log.propagate = False
    for h in list(log.handlers):
        if type(h) is logging.StreamHandler:
            log.removeHandler(h)
        else:
            h.addFilter(_not_transitions)
    collect = _Collect()
    log.addHandler(collect)
    return collect


def _read_pin(args) -> bytearray:
    from .domain import _Usage, read_secret
    try:
        pin = read_secret(getattr(args, "pin_file", None), PIN_ENV, "user PIN", "--pin-file")
    except _Usage as e:
        raise Usage(str(e)) from None
    if pin is None:
        raise Usage(f"no user PIN: set {PIN_ENV}, give --pin-file FILE, or run on a "
                    "terminal to be prompted")
    return pin


def _label(info) -> str:
    from .engine.replication import describe_label
    return describe_label(info)


def _login(m, pin: bytearray) -> int:
    from .members.module import ffi
    from .spec.constants import CKR, CKU_USER
    buf = ffi.new("CK_UTF8CHAR[]", max(len(pin), 1))
    try:
        ffi.memmove(buf, pin, len(pin))
        rv = m.call("C_Login", m.anchor, CKU_USER, buf, len(pin))
    finally:
        ffi.memmove(buf, b"\0" * len(pin), len(pin))
    return CKR.OK if rv == CKR.USER_ALREADY_LOGGED_IN else rv


def synchronize_now(config, pin: bytearray, out=print) -> int:
    """Run the synchronisation over ``config``'s members; print what happened with
    ``out``; return the exit status (0 everything in sync, 1 not)."""
    from .engine.group import Group
    from .engine.replication import Replicator
    from .members.member import ONLINE, TOKEN_NOT_PRESENT, MemberDown
    from .spec.constants import CKR, CKU_USER

    collect = _setup_logging(config)
    g = Group(config)
    # --now is the operator asking: copy even where the config says synchronize = false
    g.settings = dataclasses.replace(config.group, synchronize=True)
    g.replicator = Replicator(g)
    problems: list[str] = []
    unreachable: dict[str, str] = {}
    try:
        for m in g.members:
            try:
                g.bring_up(m)          # not logged in yet: starts it, finds the domain key
            except Exception as e:  # noqa: BLE001 - reported, the others go on
                reason = getattr(e, "reason", None) or str(e) or type(e).__name__
                if isinstance(e, P11Error) and rv_name(e.rv) not in reason:
                    reason += f" ({rv_name(e.rv)})"
                m.set_state(TOKEN_NOT_PRESENT, reason)
                unreachable[m.name] = reason
        online = g.online
        if not online:
            raise Failed("no member could be started: " + "; ".join(
                f"member '{n}': {r}" for n, r in unreachable.items()))
        # the primary first: a wrong PIN is tried on one token only
        primary = online[0]
        try:
            rv = _login(primary, pin)
        except MemberDown as e:
            raise Failed(f"member '{primary.name}' failed while logging in ({e.reason}); "
                         "nothing copied") from None
        if rv != CKR.OK:
            hint = {CKR.PIN_INCORRECT: "check the user PIN (the same on every member)",
                    CKR.PIN_LOCKED: "the user PIN is locked on this token",
                    CKR.PIN_LEN_RANGE: "check the user PIN"}.get(rv, "check the token")
            raise Failed(f"member '{primary.name}' refused the user PIN ({rv_name(rv)}); "
                         f"{hint}; nothing copied")
        for m in online[1:]:
            try:
                rv = _login(m, pin)
            except MemberDown as e:
                unreachable[m.name] = e.reason
                continue
            if rv != CKR.OK:
                m.set_state(TOKEN_NOT_PRESENT, f"refused the user PIN ({rv_name(rv)})")
                unreachable[m.name] = (f"refused the user PIN the primary '{primary.name}' "
                                       f"accepted ({rv_name(rv)})")
        g.login = CKU_USER
        members = g.online
        copied, removed = [], []
        if len(members) >= 2:
            res = g.replicator.sync(members)
            if res is not None:
                copied, removed, _ = res
        # what is still missing, and why
        rep = g.replicator
        inv, union = {}, {}
        for m in g.online:
            try:
                inv[m.name] = rep.inventory(m)
            except (P11Error, MemberDown) as e:
                unreachable[m.name] = f"listing its objects failed ({e})"
        for m in g.members:                      # failed during the synchronisation
            if m.state != ONLINE and m.name not in unreachable:
                unreachable[m.name] = f"failed ({m.last_error or m.state})"
        for name, objs in inv.items():
            for fp, (mh, info) in objs.items():
                union.setdefault(fp, (name, info))
        missing: dict[tuple, list[str]] = {}     # (object, holder, reason) -> members
        for name, objs in inv.items():
            for fp, (src, info) in union.items():
                if fp in objs or (fp in rep.tombstones and not info.internal):
                    continue
                reason = _why(fp, info, name, rep, collect.messages)
                missing.setdefault((_label(info), src, reason), []).append(name)
    finally:
        try:
            g.stop()
        except Exception:  # noqa: BLE001 - the result is already known
            pass

    records: dict[str, dict[str, int]] = {}     # member -> hashim record kind -> count
    for name, info in copied:
        if info.internal:
            kind = _label(info).split()[-1]
            records.setdefault(name, {}).setdefault(kind, 0)
            records[name][kind] += 1
        else:
            out(f"copied {_label(info)} to {name}")
    for name, kinds in records.items():
        n = sum(kinds.values())
        out(f"copied {n} hashim record{'s' if n > 1 else ''} ("
            + ", ".join(f"{k}{'s' if c > 1 else ''}" for k, c in sorted(kinds.items()))
            + f") to {name}")
    copied = [(n, i) for n, i in copied if not i.internal]
    for name, info in removed:
        out(f"destroyed {_label(info)} on {name} (it was destroyed through the HA slot "
            f"while {name} was away)")
    for (what, src, reason), names in missing.items():
        problems.append(what)
        out(f"not copied: {what} (held by {src}) to {', '.join(names)}: {reason}")
    for name, reason in unreachable.items():
        out(f"member '{name}' not synchronised: {reason}")
    in_sync = [m.name for m in g.members if m.name not in unreachable]
    summary = (f"synchronised group '{config.group.label}': {len(in_sync)} of "
               f"{len(g.members)} members ({', '.join(in_sync)}), {len(copied)} copied, "
               f"{len(removed)} destroyed, {len(problems)} not copied")
    if not copied and not removed and not problems and not unreachable:
        summary += "; every member already held every object"
    out(summary)
    log.info("hashim group synchronize --now: %s", summary)
    return 1 if problems or unreachable else 0


def _why(fp, info, member, rep, messages) -> str:
    """The reason an object is still missing on ``member``."""
    if fp in rep.unreplicable:
        reason = rep.unreplicable[fp][1]
        if "domain key" in reason and "lacks" in reason:
            reason += " (see 'hashim domain check'; 'hashim domain add-member' puts it on a " \
                      "member)"
        return reason
    label = _label(info)
    for msg in reversed(messages):
        if msg.startswith(f"sync: copying {label} to '{member}' failed"):
            return msg.split(" failed ", 1)[1].strip("() ") or "the copy failed"
    return "the copy failed (see 'hashim log')"


def main(args) -> int:
    """``hashim group synchronize --now`` (``args.config_path``, ``args.pin_file``)."""
    try:
        config = cfg.load(args.config_path, check_files=True)
        pin = _read_pin(args)
        try:
            return synchronize_now(config, pin)
        finally:
            for i in range(len(pin)):
                pin[i] = 0
    except (Usage, Failed) as e:
        sys.stdout.flush()
        sys.stderr.write("hashim: " + " ".join(str(e).split()) + "\n")
        sys.stderr.flush()
        return 2 if isinstance(e, Usage) else 1
