"""shim.config: loading, validation messages, and locked atomic comment-preserving edits."""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from shim import config as cfg
from shim.config import Config, ConfigError, GroupConfig, MemberConfig
from tests import softhsm

MODULE = os.path.abspath(softhsm.__file__)      # any existing readable file will do


def write(tmp_path: Path, text: str, name: str = "hashim.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def member(name="hsm-a", module=MODULE, extra="token_label = \"ha-a\"\n") -> str:
    return f'\n[[member]]\nname = "{name}"\nmodule = "{module}"\n{extra}'


def one_member(group: str = "", **kw) -> str:
    return "[group]\n" + group + member(**kw)


def error(tmp_path, text, **kw) -> ConfigError:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        cfg.load(p, **kw)
    e = ei.value
    s = str(e)
    assert "\n" not in s
    assert s.startswith(p + ": "), s
    return e


FULL = f"""\
# the payments group
[group]
label = "payments-ha"        # token label of the HA slot
ha_only = false
synchronize = true
command_timeout = 20.0
heartbeat_interval = 2
recovery_interval = 60.0
recovery_attempts = 5
log = "/var/log/hashim/ha.log"
slot_id = 7

[[member]]                   # first = primary
name = "hsm-a"
module = "{MODULE}"
token_label = "ha-a"
private_instance = true
env = {{ SOFTHSM2_CONF = "/etc/hashim/hsm-a.conf" }}
isolate = false

[[member]]
name = "hsm-b"
module = "{MODULE}"
token_serial = "0123456789abcdef"
isolate = true
"""


# --------------------------------------------------------------------------- loading

def test_full_example_loads(tmp_path):
    c = cfg.load(write(tmp_path, FULL))
    assert isinstance(c, Config)
    assert c.path == str(tmp_path / "hashim.toml")
    assert c.mtime == os.stat(c.path).st_mtime
    g = c.group
    assert (g.label, g.ha_only, g.synchronize, g.slot_id) == ("payments-ha", False, True, 7)
    assert g.command_timeout == 20.0 and isinstance(g.heartbeat_interval, float)
    assert g.heartbeat_interval == 2.0 and g.recovery_interval == 60.0
    assert g.recovery_attempts == 5 and g.log == "/var/log/hashim/ha.log"
    assert g.serial == hashlib.sha256(b"payments-ha").hexdigest()[:16]
    assert g.state_dir and os.path.isabs(g.state_dir)
    assert c.member_names == ("hsm-a", "hsm-b")
    a, b = c.members
    assert a == MemberConfig(name="hsm-a", module=MODULE, token_label="ha-a", token_serial=None,
                             private_instance=True,
                             env={"SOFTHSM2_CONF": "/etc/hashim/hsm-a.conf"}, isolate=False)
    assert (b.token_label, b.token_serial, b.isolate, b.env) == \
        (None, "0123456789abcdef", True, {})
    assert c.primary_candidate is a and c.member("hsm-b") is b


def test_defaults(tmp_path):
    c = cfg.load(write(tmp_path, member()))
    d = GroupConfig()
    assert c.group.label == "hashim" == d.label
    assert (c.group.ha_only, c.group.synchronize) == (True, True)
    assert (c.group.command_timeout, c.group.heartbeat_interval) == (20.0, 2.0)
    assert (c.group.recovery_interval, c.group.recovery_attempts) == (60.0, 3)
    assert c.group.log is None and c.group.slot_id == 0
    assert c.group.serial == cfg.derived_serial("hashim")
    assert c.group.state_dir == cfg.derived_state_dir(c.path)
    assert c.members[0].env == {} and not c.members[0].private_instance


def test_explicit_serial_state_dir_and_unlimited(tmp_path):
    c = cfg.load(write(tmp_path, one_member(
        'serial = "HA0001"\nstate_dir = "/run/hashim/x"\nrecovery_attempts = "unlimited"\n')))
    assert c.group.serial == "HA0001"
    assert c.group.state_dir == "/run/hashim/x"
    assert c.group.recovery_attempts is None


def test_state_dir_depends_on_config_path(tmp_path):
    a = cfg.derived_state_dir(str(tmp_path / "a.toml"))
    b = cfg.derived_state_dir(str(tmp_path / "b.toml"))
    assert a != b and os.path.dirname(a) == os.path.dirname(b)
    assert str(os.getuid()) in a
    assert cfg.derived_state_dir(str(tmp_path / "a.toml")) == a


def test_real_softhsm_tokens(tmp_path):
    if not shutil.which("softhsm2-util") or not os.path.exists(softhsm.SOFTHSM_LIB):
        pytest.skip("SoftHSM2 not installed")
    toks = [softhsm.make_token(tmp_path, "ha-a"),
            softhsm.make_token(tmp_path, "ha-b", private_lib=False)]
    p = softhsm.write_config(tmp_path / "hashim.toml", toks, label="pay",
                             command_timeout=5.0, ha_only=False)
    c = cfg.load(str(p))
    assert c.member_names == ("ha-a", "ha-b")
    assert c.members[0].env == {"SOFTHSM2_CONF": str(toks[0].conf)}
    assert c.members[1].private_instance is True
    assert c.group.command_timeout == 5.0 and c.group.ha_only is False


# --------------------------------------------------------------------------- default_path

def test_default_path(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("HASHIM_CONF", raising=False)
    system = tmp_path / "etc" / "hashim.toml"
    monkeypatch.setattr(cfg, "SYSTEM_PATH", str(system))
    user = home / ".config" / "hashim" / "hashim.toml"
    # none exists: the first candidate
    assert cfg.default_path() == str(user)
    system.parent.mkdir()
    system.write_text("")
    assert cfg.default_path() == str(system)
    user.parent.mkdir(parents=True)
    user.write_text("")
    assert cfg.default_path() == str(user)
    monkeypatch.setenv("HASHIM_CONF", str(tmp_path / "env.toml"))
    assert cfg.default_path() == str(tmp_path / "env.toml")      # even if missing
    monkeypatch.chdir(tmp_path)
    assert cfg.default_path("rel.toml") == str(tmp_path / "rel.toml")
    assert cfg.default_path("~/x.toml") == str(home / "x.toml")


# --------------------------------------------------------------------------- file errors

def test_missing_file(tmp_path):
    p = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as ei:
        cfg.load(p)
    s = str(ei.value)
    assert s.startswith(p + ": file not found; ") and "HASHIM_CONF" in s and "\n" not in s


def test_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        cfg.load(str(tmp_path))


def test_unreadable(tmp_path, monkeypatch):
    p = write(tmp_path, FULL)

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(cfg, "open", denied, raising=False)
    with pytest.raises(ConfigError) as ei:
        cfg.load(p)
    assert str(ei.value) == (f"{p}: cannot read it: permission denied; run as a user who may "
                             "read it, or fix its permissions")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_for_real(tmp_path):
    p = write(tmp_path, FULL)
    os.chmod(p, 0)
    with pytest.raises(ConfigError, match="permission denied"):
        cfg.load(p)


def test_not_toml_names_the_line(tmp_path):
    e = error(tmp_path, '[group]\nlabel = "x"\nha_only = \n')
    assert e.where == "line 3"
    assert ": line 3: not valid TOML: " in str(e) and "fix the syntax on line 3" in str(e)


def test_not_toml_end_of_document(tmp_path):
    e = error(tmp_path, '[group]\nlabel = "x')
    assert "not valid TOML" in str(e) and "line" in str(e)


def test_not_utf8(tmp_path):
    p = tmp_path / "hashim.toml"
    p.write_bytes(b'[group]\nlabel = "\xff"\n')
    with pytest.raises(ConfigError, match=r"line 2: not UTF-8 text"):
        cfg.load(str(p))


# --------------------------------------------------------------------------- key errors

def test_unknown_group_key_suggests(tmp_path):
    e = error(tmp_path, one_member("comand_timeout = 5\n"))
    assert str(e).endswith("[group] comand_timeout: unknown key; did you mean 'command_timeout'?")
    assert (e.where, e.key) == ("[group]", "comand_timeout")


def test_unknown_member_key_suggests(tmp_path):
    e = error(tmp_path, member(extra='token_label = "a"\nprivate_instanse = true\n'))
    assert str(e).endswith("member 'hsm-a' private_instanse: unknown key; "
                           "did you mean 'private_instance'?")


def test_unknown_key_without_close_match_lists_keys(tmp_path):
    e = error(tmp_path, one_member("zzz = 1\n"))
    assert "[group] zzz: unknown key; known keys: label, slot_id" in str(e)


def test_unknown_top_level_table(tmp_path):
    e = error(tmp_path, "[grup]\nlabel = 'x'\n" + member())
    assert "top level grup: unknown key; did you mean 'group'?" in str(e)


def test_hyphenated_key_suggests_underscore(tmp_path):
    e = error(tmp_path, one_member("ha-only = false\n"))
    assert "did you mean 'ha_only'?" in str(e)


@pytest.mark.parametrize("line,expect", [
    ('ha_only = "yes"', "[group] ha_only: must be true or false, got 'yes' (a string); "
                        "write true or false without quotes"),
    ('synchronize = 1', "[group] synchronize: must be true or false, got 1 (an integer)"),
    ('command_timeout = "20"', "[group] command_timeout: must be a number of seconds, got "
                               "'20' (a string); write a number without quotes"),
    ('heartbeat_interval = true', "[group] heartbeat_interval: must be a number of seconds, "
                                  "got true (a boolean)"),
    ('slot_id = 1.5', "[group] slot_id: must be an integer, got 1.5 (a number)"),
    ('slot_id = -1', "[group] slot_id: must be between 0 and 4294967295, got -1"),
    ('label = 5', "[group] label: must be a string, got 5 (an integer); put the value in "
                  "double quotes"),
    ('label = ""', "[group] label: is empty"),
    ('log = "ha.log"', "[group] log: must be an absolute path, got 'ha.log'; give the full "
                       "path"),
    ('state_dir = "run/x"', "[group] state_dir: must be an absolute path"),
    ('serial = "0123456789abcdef0"', "[group] serial: is 17 characters, longer than the 16"),
    ('label = " x"', "[group] label: starts or ends with a space"),
])
def test_group_value_errors(tmp_path, line, expect):
    e = error(tmp_path, one_member(line + "\n"))
    assert expect in str(e)


@pytest.mark.parametrize("line,expect", [
    ("command_timeout = 0", "[group] command_timeout: must be a positive number of seconds, "
                            "got 0.0; use a finite number greater than 0"),
    ("command_timeout = -1", "command_timeout: must be a positive number of seconds, got -1.0"),
    ("command_timeout = nan", "command_timeout: must be a positive number of seconds, got nan"),
    ("recovery_interval = inf", "recovery_interval: must be a positive number of seconds"),
    ("heartbeat_interval = 0.0", "heartbeat_interval: must be a positive number of seconds"),
    ("heartbeat_interval = 20", "[group] heartbeat_interval: heartbeat_interval (20 s) must "
                                "be shorter than command_timeout (20 s); lower "
                                "heartbeat_interval or raise command_timeout"),
    ("command_timeout = 1.5", "[group] command_timeout: heartbeat_interval (2 s) must be "
                              "shorter than command_timeout (1.5 s)"),
    ("recovery_attempts = 2", "[group] recovery_attempts: must be at least 3, got 2; use 3 "
                              "or more, or \"unlimited\""),
    ('recovery_attempts = "forever"', "recovery_attempts: must be a number or \"unlimited\", "
                                      "got 'forever'"),
    ("recovery_attempts = 3.5", "recovery_attempts: must be a whole number or \"unlimited\""),
    ("recovery_attempts = true", "recovery_attempts: must be a whole number or \"unlimited\""),
])
def test_numeric_ranges(tmp_path, line, expect):
    e = error(tmp_path, one_member(line + "\n"))
    assert expect in str(e)


def test_numeric_edges_ok(tmp_path):
    c = cfg.load(write(tmp_path, one_member(
        "command_timeout = 0.5\nheartbeat_interval = 0.25\nrecovery_attempts = 3\n")))
    assert (c.group.command_timeout, c.group.heartbeat_interval) == (0.5, 0.25)
    c = cfg.load(write(tmp_path, one_member("recovery_attempts = 1000000\n")))
    assert c.group.recovery_attempts == 1000000


def test_label_32_bytes_utf8(tmp_path):
    ok = "é" * 16                                       # 32 bytes
    c = cfg.load(write(tmp_path, one_member(f'label = "{ok}"\n')))
    assert c.group.label == ok
    e = error(tmp_path, one_member(f'label = "{ok}x"\n'))
    assert "[group] label: is 33 bytes in UTF-8, longer than the 32 bytes of a PKCS#11 token " \
           "label; shorten it to at most 32 bytes" in str(e)
    e = error(tmp_path, member(extra=f'token_label = "{"a" * 33}"\n'))
    assert "member 'hsm-a' token_label: is 33 bytes" in str(e)


def test_group_must_be_a_table(tmp_path):
    e = error(tmp_path, "[[group]]\nlabel = 'x'\n" + member())
    assert "top level group: must be a table, got an array; write a single [group] table" \
        in str(e)


# --------------------------------------------------------------------------- members

def test_zero_members(tmp_path):
    e = error(tmp_path, '[group]\nlabel = "x"\n')
    assert str(e).endswith("[[member]]: no members configured; add at least one [[member]] "
                           "table (hashim group add-member NAME ...)")


def test_member_single_bracket_table(tmp_path):
    e = error(tmp_path, f'[member]\nname = "a"\nmodule = "{MODULE}"\ntoken_label = "a"\n')
    assert "top level member: is a single [member] table; write each member as [[member]]" \
        in str(e)


def test_member_missing_name_is_numbered(tmp_path):
    text = member() + f'\n[[member]]\nmodule = "{MODULE}"\ntoken_label = "b"\n'
    e = error(tmp_path, text)
    assert str(e).endswith('[[member]] #2 name: missing; add name = "..." to this table')


def test_member_empty_name(tmp_path):
    e = error(tmp_path, member(name=""))
    assert "[[member]] #1 name: is empty" in str(e)


def test_member_invalid_name(tmp_path):
    e = error(tmp_path, member(name="hsm a/b"))
    assert "[[member]] #1 name: 'hsm a/b' is not a valid member name; use letters, digits" \
        in str(e)


def test_duplicate_member_names(tmp_path):
    text = member() + member(extra='token_label = "other"\n')
    e = error(tmp_path, text)
    assert str(e).endswith("[[member]] #2 name: 'hsm-a' is already the name of [[member]] #1; "
                           "give each member a unique name")


def test_same_token_twice(tmp_path):
    e = error(tmp_path, member() + member(name="hsm-b"))
    assert "member 'hsm-b' token_label: refers to the same token as member 'hsm-a'" in str(e)


def test_token_label_and_serial(tmp_path):
    e = error(tmp_path, member(extra='token_label = "a"\ntoken_serial = "1"\n'))
    assert str(e).endswith("member 'hsm-a' token_serial: both token_label and token_serial "
                           "are given; keep exactly one of them")
    e = error(tmp_path, member(extra=""))
    assert "member 'hsm-a' token_label: missing: the member's token is not identified; add " \
           "token_label = \"...\" or token_serial = \"...\" (exactly one)" in str(e)


def test_module_missing_key(tmp_path):
    e = error(tmp_path, '[[member]]\nname = "a"\ntoken_label = "a"\n')
    assert "member 'a' module: missing" in str(e)


def test_module_not_absolute(tmp_path):
    e = error(tmp_path, member(module="libsofthsm2.so"))
    assert "member 'hsm-a' module: must be an absolute path, got 'libsofthsm2.so'; give the " \
           "full path, e.g. /usr/lib/softhsm/libsofthsm2.so" in str(e)
    e = error(tmp_path, member(module="libsofthsm2.so"), check_files=False)   # always checked
    assert "must be an absolute path" in str(e)


def test_module_file_checked_only_when_asked(tmp_path):
    missing = str(tmp_path / "libnope.so")
    text = member(module=missing)
    e = error(tmp_path, text)
    assert str(e).endswith(f"member 'hsm-a' module: {missing} does not exist; install the "
                           "module or correct the path")
    c = cfg.load(write(tmp_path, text), check_files=False)
    assert c.members[0].module == missing
    e = error(tmp_path, member(module=str(tmp_path)))
    assert f"module: {tmp_path} is not a regular file" in str(e)


def test_module_unreadable(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(cfg.os, "access",
                        lambda p, m, **kw: False if p == MODULE else real_access(p, m, **kw))
    e = error(tmp_path, member())
    assert f"module: {MODULE} is not readable by this user" in str(e)


@pytest.mark.parametrize("env,expect", [
    ('env = "SOFTHSM2_CONF=/x"', "member 'hsm-a' env: must be a table of strings, got a "
                                 "string; write env = { NAME = \"value\" }"),
    ('env = { A = 1 }', "member 'hsm-a' env.A: must be a string, got an integer; put the "
                        "value in double quotes"),
    ('env = { A = { B = "c" } }', "member 'hsm-a' env.A: must be a string, got a table"),
])
def test_env_errors(tmp_path, env, expect):
    e = error(tmp_path, member(extra='token_label = "a"\n' + env + "\n"))
    assert expect in str(e)


def test_env_values_never_in_messages(tmp_path):
    e = error(tmp_path, member(extra='token_label = "a"\nenv = { USER_PIN = 123456 }\n'))
    assert "123456" not in str(e)


def test_bool_member_keys(tmp_path):
    e = error(tmp_path, member(extra='token_label = "a"\nisolate = "no"\n'))
    assert "member 'hsm-a' isolate: must be true or false, got 'no' (a string)" in str(e)


def test_all_errors_collected(tmp_path):
    e = error(tmp_path, one_member("ha_only = 1\ncommand_timeout = -1\n"))
    assert len(e.errors) == 2 and e.errors[0] is e
    assert "command_timeout" in str(e.errors[1])


def test_member_from_dict(tmp_path):
    m = cfg.member_from_dict({"name": "x", "module": MODULE, "token_serial": "12"})
    assert m.token_serial == "12" and m.env == {}
    with pytest.raises(ConfigError) as ei:
        cfg.member_from_dict({"name": "x", "module": "/no/such.so", "token_serial": "1"},
                             file="f.toml")
    assert str(ei.value) == ("f.toml: member 'x' module: /no/such.so does not exist; install "
                             "the module or correct the path")


def test_config_error_format():
    e = ConfigError("bad\nthing", "do\nthis", file="/f", where="[group]", key="k")
    assert str(e) == "/f: [group] k: bad thing; do this"
    assert str(ConfigError("plain")) == "plain"


# --------------------------------------------------------------------------- edit

COMMENTED = f"""\
# hashim for payments -- keep this header
[group] # the group
label = "pay"  # HA slot label
command_timeout = 20.0  # seconds

# primary HSM, in rack 1
[[member]]
name = "hsm-a"
module = "{MODULE}"
token_label = "ha-a"  # label on the card

# secondary HSM, in rack 2
[[member]]
name = "hsm-b"
module = "{MODULE}"
token_label = "ha-b"

# end of members
"""


def test_edit_preserves_comments(tmp_path):
    p = write(tmp_path, COMMENTED)
    c = cfg.edit(p, lambda d: cfg.set_group_key(d, "command_timeout", 30.0))
    assert c.group.command_timeout == 30.0
    text = Path(p).read_text()
    assert text == COMMENTED.replace("command_timeout = 20.0  # seconds",
                                     "command_timeout = 30.0  # seconds")
    cfg.edit(p, lambda d: cfg.set_group_key(d, "ha_only", False))
    text = Path(p).read_text()
    assert 'command_timeout = 30.0  # seconds\nha_only = false\n\n# primary HSM' in text
    m = MemberConfig("hsm-c", MODULE, None, "42", env={"A": "b"}, isolate=True)
    c = cfg.edit(p, lambda d: cfg.add_member(d, m))
    assert c.member_names == ("hsm-a", "hsm-b", "hsm-c") and c.members[2] == m
    text = Path(p).read_text()
    for comment in ("# hashim for payments -- keep this header", "# the group",
                    "# HA slot label", "# primary HSM, in rack 1", "# label on the card",
                    "# secondary HSM, in rack 2"):
        assert comment in text
    assert text.rstrip().endswith("# end of members")
    c = cfg.edit(p, lambda d: cfg.remove_member(d, "hsm-a"))
    assert c.member_names == ("hsm-b", "hsm-c")
    text = Path(p).read_text()
    assert "# primary HSM" not in text and "# label on the card" not in text
    assert '# secondary HSM, in rack 2\n[[member]]\nname = "hsm-b"' in text
    assert "# hashim for payments" in text and "# HA slot label" in text
    assert cfg.edit(p, lambda d: cfg.unset_group_key(d, "ha_only")).group.ha_only is True
    assert "ha_only" not in Path(p).read_text()


def test_remove_member_keeps_blank_line(tmp_path):
    import tomlkit
    text = '[group]\nlabel = "x"\n\n[[member]]\nname = "a"\n[[member]]\nname = "b"\n'
    for name, expect in [("a", '[group]\nlabel = "x"\n\n[[member]]\nname = "b"\n'),
                         ("b", '[group]\nlabel = "x"\n\n[[member]]\nname = "a"\n')]:
        doc = tomlkit.parse(text)
        cfg.remove_member(doc, name)
        assert doc.as_string() == expect
    doc = tomlkit.parse(text)
    with pytest.raises(KeyError):
        cfg.remove_member(doc, "c")


def test_edit_is_atomic_replace(tmp_path):
    p = write(tmp_path, COMMENTED)
    os.chmod(p, 0o640)
    ino = os.stat(p).st_ino
    cfg.edit(p, lambda d: cfg.set_group_key(d, "label", "pay2"))
    st = os.stat(p)
    assert st.st_ino != ino                           # a new file was renamed over it
    assert stat.S_IMODE(st.st_mode) == 0o640          # mode kept
    assert sorted(os.listdir(tmp_path)) == ["hashim.toml", "hashim.toml.lock"]


def test_edit_failed_write_leaves_file_alone(tmp_path, monkeypatch):
    p = write(tmp_path, COMMENTED)

    def boom(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cfg.os, "replace", boom)
    with pytest.raises(ConfigError) as ei:
        cfg.edit(p, lambda d: cfg.set_group_key(d, "label", "pay2"))
    assert str(ei.value).startswith(p + ": cannot write it: No space left on device")
    assert Path(p).read_text() == COMMENTED
    assert sorted(os.listdir(tmp_path)) == ["hashim.toml", "hashim.toml.lock"]


def test_edit_refuses_invalid_result(tmp_path):
    p = write(tmp_path, COMMENTED)
    with pytest.raises(ConfigError) as ei:
        cfg.edit(p, lambda d: cfg.set_group_key(d, "recovery_attempts", 1))
    assert str(ei.value) == (f"{p}: [group] recovery_attempts: must be at least 3, got 1; "
                             "use 3 or more, or \"unlimited\"")
    assert Path(p).read_text() == COMMENTED


def test_edit_refuses_when_file_changed_on_disk(tmp_path):
    p = write(tmp_path, COMMENTED)

    def other_writer(doc):
        Path(p).write_text(COMMENTED + "# someone else\n")
        cfg.set_group_key(doc, "label", "mine")
    with pytest.raises(ConfigError) as ei:
        cfg.edit(p, other_writer)
    assert str(ei.value) == (f"{p}: changed on disk while hashim was editing it, nothing was "
                             "written; check the file and run the command again")
    assert Path(p).read_text() == COMMENTED + "# someone else\n"


def test_edit_detects_same_size_same_mtime_change(tmp_path):
    p = write(tmp_path, COMMENTED)
    st = os.stat(p)

    def sneaky(doc):
        Path(p).write_text(COMMENTED.replace("pay", "PAY"))       # same size
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))         # same mtime
        cfg.set_group_key(doc, "label", "mine")
    with pytest.raises(ConfigError, match="changed on disk"):
        cfg.edit(p, sneaky)
    assert 'label = "PAY"' in Path(p).read_text()


def test_edit_refuses_when_file_deleted(tmp_path):
    p = write(tmp_path, COMMENTED)

    def delete(doc):
        os.unlink(p)
        cfg.set_group_key(doc, "label", "mine")
    with pytest.raises(ConfigError, match="changed on disk"):
        cfg.edit(p, delete)
    assert not os.path.exists(p)


def test_edit_lock_serialises_writers(tmp_path):
    import fcntl
    p = write(tmp_path, COMMENTED)
    fd = os.open(p + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(ConfigError) as ei:
            cfg.edit(p, lambda d: cfg.set_group_key(d, "label", "x"), lock_timeout=0.1)
        assert "another hashim command is editing it" in str(ei.value)
        released = []

        def release():
            time.sleep(0.3)
            released.append(time.monotonic())
            os.close(fd)
        t = threading.Thread(target=release)
        t.start()
        c = cfg.edit(p, lambda d: cfg.set_group_key(d, "label", "x"), lock_timeout=10)
        done = time.monotonic()
        t.join()
        assert released and done >= released[0]
        assert c.group.label == "x"
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def test_concurrent_edits_all_land(tmp_path):
    p = write(tmp_path, COMMENTED)
    names = [f"m{i}" for i in range(8)]
    errors = []

    def add(n):
        try:
            cfg.edit(p, lambda d: cfg.add_member(d, {"name": n, "module": MODULE,
                                                     "token_label": n}))
        except Exception as e:      # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=add, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(cfg.load(p).member_names) == {"hsm-a", "hsm-b", *names}


def test_edit_missing_file_and_create(tmp_path):
    p = str(tmp_path / "sub" / "new.toml")
    with pytest.raises(ConfigError, match="file not found"):
        cfg.edit(p, lambda d: None)
    c = cfg.edit(p, lambda d: cfg.add_member(d, {"name": "a", "module": MODULE,
                                                 "token_label": "a"}), create=True)
    assert c.member_names == ("a",)
    assert Path(p).read_text().startswith("# hashim configuration")
    assert cfg.load(p).members == c.members


def test_edit_fn_error_gets_file(tmp_path):
    p = write(tmp_path, COMMENTED)

    def fn(doc):
        raise ConfigError("nope", "do something", where="member 'x'")
    with pytest.raises(ConfigError) as ei:
        cfg.edit(p, fn)
    assert str(ei.value) == f"{p}: member 'x': nope; do something"


def test_edit_check_files_per_member(tmp_path):
    p = write(tmp_path, member(module=str(tmp_path / "gone.so")))
    cfg.edit(p, lambda d: cfg.set_group_key(d, "label", "x"))          # not checked
    new = {"name": "b", "module": str(tmp_path / "also-gone.so"), "token_label": "b"}
    with pytest.raises(ConfigError, match="member 'b' module: .*also-gone.so does not exist"):
        cfg.edit(p, lambda d: cfg.add_member(d, new), check_files={"b"})
    new["module"] = MODULE
    c = cfg.edit(p, lambda d: cfg.add_member(d, new), check_files={"b"})
    assert c.member_names == ("hsm-a", "b")


def test_edit_not_toml(tmp_path):
    p = write(tmp_path, "[group\n")
    with pytest.raises(ConfigError, match=r"line 1: not valid TOML"):
        cfg.edit(p, lambda d: None)


def test_edit_through_symlink(tmp_path):
    real = write(tmp_path, COMMENTED, "real.toml")
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    cfg.edit(str(link), lambda d: cfg.set_group_key(d, "label", "viaLink"))
    assert link.is_symlink()
    assert cfg.load(real).group.label == "viaLink"


def test_parse_group_value():
    P = cfg.parse_group_value
    assert P("ha_only", "off") is False and P("synchronize", "TRUE") is True
    assert P("command_timeout", "5") == 5.0 and P("slot_id", "3") == 3
    assert P("recovery_attempts", "unlimited") == "unlimited"
    assert P("recovery_attempts", "7") == 7 and P("label", "a b") == "a b"
    with pytest.raises(ConfigError, match=r"\[group\] comand_timeout: unknown key; did you "
                                          r"mean 'command_timeout'\?"):
        P("comand_timeout", "1")
    for k, v in [("ha_only", "maybe"), ("command_timeout", "soon"), ("command_timeout", "inf"),
                 ("slot_id", "x"), ("recovery_attempts", "many")]:
        with pytest.raises(ConfigError, match=k):
            P(k, v)


def test_module_docstring_documents_every_key():
    doc = cfg.__doc__
    for k in cfg.GROUP_KEYS + cfg.MEMBER_KEYS:
        assert f"| `{k}`" in doc, k
