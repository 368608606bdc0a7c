"""The Python↔Lua contract: every script's header agrees with the codec, and the scripts
take their positions and reply codes from it."""

from __future__ import annotations

import re
import struct

import pytest

from quotagate.coordinator import codec
from quotagate.coordinator.codec import LUA_DIR, SCRIPTS, ScriptArgs
from quotagate.coordinator.policy import Kind, parse_policies

CODE_NAMES = set(codec.REPLY_CODES)


def _header(name: str) -> str:
    text = (LUA_DIR / f"{name}.lua").read_text()
    return "\n".join(line for line in text.splitlines() if line.startswith("--"))


def _statement(header: str, label: str) -> str:
    """The header's `-- LABEL: ...` statement, up to its `.`, over continuation lines."""
    match = re.search(rf"^-- {label}: (.*?)\.(\n|$)", header, re.M | re.S)
    assert match, f"no '-- {label}:' line"
    return re.sub(r"\s*\n--\s*", " ", match[1])


def _listed(header: str, label: str) -> list[str]:
    names = re.split(r"[;.]", _statement(header, label))[0]
    return [name.strip() for name in names.split(",")]


@pytest.mark.parametrize("args", SCRIPTS, ids=lambda a: a.script)
def test_the_argv_line_names_the_codecs_fields_in_order(args: type[ScriptArgs]) -> None:
    header = _header(args.script)
    assert _listed(header, "ARGV") == list(args.names())
    assert ("then the policy block" in _statement(header, "ARGV")) is args.policy
    for name in args.names():  # each field explained on a line of its own
        assert re.search(rf"^--\s+{name}\s+\S", header, re.M), name


@pytest.mark.parametrize("args", [a for a in SCRIPTS if a.policy], ids=lambda a: a.script)
def test_quota_scripts_name_the_key_layout(args: type[ScriptArgs]) -> None:
    assert _listed(_header(args.script), "KEYS")[: len(codec.KEY_LAYOUT)] == list(codec.KEY_LAYOUT)


def test_lib_documents_the_policy_block_and_key_layout_as_the_codec_builds_them() -> None:
    header = _header("lib")
    assert _listed(header, "KEYS")[: len(codec.KEY_LAYOUT)] == list(codec.KEY_LAYOUT)
    block = re.search(r"^--\s+(ttl_ms, .+?); then per limit: (.+?)\.\n", header, re.M | re.S)
    assert block, "lib.lua does not spell out the policy block"
    assert [n.strip() for n in block[1].split(",")] == list(codec.POLICY_FIELDS)
    per_limit = re.sub(r"\s*--\s*", " ", block[2])
    assert [n.strip() for n in per_limit.split(",")] == list(codec.LIMIT_FIELDS)


@pytest.mark.parametrize("args", SCRIPTS, ids=lambda a: a.script)
def test_scripts_use_names_not_positions(args: type[ScriptArgs]) -> None:
    body = (LUA_DIR / f"{args.script}.lua").read_text()
    code = "\n".join(line for line in body.splitlines() if not line.startswith("--"))
    assert not re.search(r"ARGV\[\d", code), "an ARGV position written as a number"
    assert not re.search(r"return \{\d", code), "a reply code written as a number"
    used = set(re.findall(r"ARG\.(\w+)", code))
    assert used <= set(args.names())
    replied = set(re.findall(r"REPLY\.(\w+)", code))
    assert replied <= CODE_NAMES
    named = set(re.findall(r"\b(" + "|".join(CODE_NAMES) + r")\b", _header(args.script)))
    assert replied == named, "the header's Reply line and the returns disagree"
    learned = set(re.findall(r"LEARN\.(\w+)", code))
    assert learned <= set(codec.LEARN_CODES)
    assert all(re.search(rf"\b{name}\b", _header(args.script)) for name in learned)


def test_the_prelude_numbers_the_fields_from_one() -> None:
    text = codec.prelude(codec.RenewArgs)
    assert "local ARG = {now_ms = 1, token = 2, renew_ttl_ms = 3}" in text
    assert "local POLICY_AT = 4" in text
    assert "local LEARN = {NONE = 0, LOWERED = 1, KEPT = 2, HIGHER = 3, NO_LIMIT = 4}" in text
    assert "local REPLY = {DENIED = 0, GRANTED = 1}" in text


def test_every_script_carries_the_whole_library_and_its_prelude() -> None:
    lib = (LUA_DIR / "lib.lua").read_text()
    for args in SCRIPTS:
        source = codec.script_source(args)
        assert source.startswith(codec.prelude(args))
        assert lib in source


def test_arguments_encode_none_and_booleans_as_the_scripts_read_them() -> None:
    args = codec.AcquireArgs(
        now_ms=None,
        token="t:k",
        cost=2,
        estimate_ms=0,
        known_epoch=None,
        known_until=7,
        writer="w1",
        known_written=None,
        loss_on_start=None,
        recovery=None,
        share_permille=500,
        class_permille=None,
        ticket=None,
        rank=0,
        classes=0,
        aging_ms=None,
        line_wait_ms=None,
        ticket_ttl_ms=2000,
    )
    assert args.argv(("x", 1)) == [
        *("", "t:k", 2, 0, "", 7, "w1", "", "", "", 500, "", "", 0, 0, "", "", 2000),
        *("x", 1),
    ]
    assert codec.RenewArgs(now_ms=5, token="t", renew_ttl_ms=9).argv(("p",)) == [5, "t", 9, "p"]


def test_replies_decode_by_code() -> None:
    granted = codec.decode_acquire([codec.GRANTED, 10, 70, 3, 90, 6])
    assert granted == codec.Granted(10, 70, 3, 90, 6)
    denied = codec.decode_acquire([codec.DENIED, 10, 5, 2, 1, 3, 4, 80, 6])
    assert denied == codec.Denied(10, 5, 2, 1, 3, 4, 80, 6)
    with pytest.raises(ValueError, match="unknown code"):
        codec.decode_acquire([7, 10])
    assert codec.decode_release([codec.DENIED, 3, b"expired"]).reason == "expired"
    quiet = codec.decode_release([codec.GRANTED, 3, 0, 0, 0, 0, 0])
    assert quiet.learned is None and not quiet.woke
    woke = codec.decode_release([codec.GRANTED, 3, 1, 2, 20, 30, 1])
    assert woke.learned == codec.Learned("LOWERED", 2, 20, 30) and woke.woke
    assert codec.decode_renew([codec.GRANTED, 3, 9]).expiry_ms == 9
    usage = codec.decode_usage([1, 2, 3, 0, 4, 5, 6, 7, 8, 9])
    assert usage.limits == ((4, 5, 6), (7, 8, 9)) and usage.in_flight == 3
    assert usage.waiting == 0
    assert codec.decode_leave([codec.GRANTED, 3]) and not codec.decode_leave([codec.DENIED, 3])


def test_the_prelude_maps_every_kind_code_back_to_its_name() -> None:
    text = codec.prelude(codec.AcquireArgs)
    found = re.search(r"^local KINDS = \{(.*)\}$", text, re.M)
    assert found, "the prelude does not name the kinds"
    names = [n.strip().strip("'") for n in found[1].split(",")]
    assert {name: at for at, name in enumerate(names, 1)} == codec.KIND_CODES
    assert set(codec.KIND_CODES) == {kind.value for kind in Kind}


def test_the_packed_policy_block_holds_the_fields_in_order() -> None:
    policy = parse_policies(
        "apis: {p: {lease_ttl: 30s, limits: [{calls: 7, per: 1m}, {concurrent: 2}]}}"
    ).apis["p"]
    blob = codec.packed_policy_block(policy)
    values = struct.unpack(f"<{len(blob) // 8}q", blob)
    assert values == codec.policy_block(policy)
    assert len(values) == len(codec.POLICY_FIELDS) + len(codec.LIMIT_FIELDS) * 2
    assert values[4] == codec.KIND_CODES["calls"] and values[5] == 7
    second = len(codec.POLICY_FIELDS) + len(codec.LIMIT_FIELDS)
    assert values[second] == codec.KIND_CODES["concurrent"] and values[second + 1] == 2
