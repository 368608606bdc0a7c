"""The contract between Python and the Lua scripts, by name: KEYS, ARGV and replies.

Every script's arguments are a frozen dataclass here; its fields, in order, are the
script's ARGV, and each script receives their positions as a Lua table built from the
same dataclass (`ARG.token` is `ARGV[2]` for acquire), so a position is written once.
Every script's ARGV then closes with the policy block (`POLICY_FIELDS`, then
`LIMIT_FIELDS` per limit, packed into one argument), and its KEYS follow `KEY_LAYOUT`.
Replies are decoded into named values; their codes are the constants below, which the
scripts receive too.

Encoding: integers as digits, booleans as "1" or "", None as "" (the scripts read ""
as "not given": Redis `TIME` for `now_ms`, no check for `epoch`, ...).
Times are integer milliseconds, as Redis stores them.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .policy import Kind, Policy, Scope

LUA_DIR = Path(__file__).parent.parent / "lua"

# Reply codes: the first element of every acquire, release and renew reply.
DENIED = 0  # acquire: no grant; release/renew: no such live lease
GRANTED = 1  # acquire: granted; release: released; renew: renewed
REPLY_CODES = {"DENIED": DENIED, "GRANTED": GRANTED}

# What a throttled release did with the limit the upstream named (design rule 8).
LEARN_CODES = {"NONE": 0, "LOWERED": 1, "KEPT": 2, "HIGHER": 3, "NO_LIMIT": 4}

# KEYS of every quota script (all share the hash tag {<tenant>|<api>}); one more per limit.
KEY_LAYOUT = ("state", "inflight_api", "inflight_key", "line", "tickets")
# A ticket's place in line: class rank * RANK_SPAN + arrival ms (a span of centuries).
RANK_SPAN = 10**13
POLICY_FIELDS = ("ttl_ms", "track_api", "track_key", "stamp_ttl_ms")
LIMIT_FIELDS = ("kind", "amount", "window_ms", "granularity_ms", "margin_ms", "assured")
# A limit's kind in the policy block; the scripts map the code back to the name (`KINDS`).
KIND_CODES = {"calls": 1, "runtime": 2, "concurrent": 3}


def _encode(value: object) -> str | int:
    if value is None:
        return ""
    kind = type(value)
    if kind is int or kind is str:  # the common case, first
        return value  # type: ignore[return-value]
    if isinstance(value, bool):
        return "1" if value else ""
    if isinstance(value, int | str):
        return value
    raise TypeError(f"cannot pass {value!r} to a script")


@dataclass(frozen=True)
class ScriptArgs:
    """Base of every script's arguments: `script` names the Lua file; `policy` says whether
    the policy block closes ARGV."""

    script: ClassVar[str]
    policy: ClassVar[bool] = True

    @classmethod
    def names(cls) -> tuple[str, ...]:
        found = _NAMES.get(cls)
        if found is None:  # once per class, not per decision
            found = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
        return found

    def argv(self, policy_block: Sequence[str | int | bytes] = ()) -> list[str | int | bytes]:
        values: list[str | int | bytes] = [_encode(getattr(self, name)) for name in self.names()]
        if self.policy:
            values.extend(policy_block)
        return values


_NAMES: dict[type[ScriptArgs], tuple[str, ...]] = {}


@dataclass(frozen=True)
class AcquireArgs(ScriptArgs):
    script: ClassVar[str] = "acquire"

    now_ms: int | None  # None: Redis TIME (only tests pass a time)
    token: str  # the lease's member in Redis (LeaseRef.member)
    cost: int  # call units
    estimate_ms: int  # run time reserved
    known_epoch: int | None  # this state's epoch as the caller last saw it
    known_until: int | None  # until when the caller saw the state sure to live
    writer: str | None  # the caller's id among the state's writers; None: not counted
    known_written: int | None  # the writer's grants the caller saw written in the epoch
    loss_on_start: int | None  # since when a missing state counts as lost
    recovery: int | None  # the time of a loss the caller saw (a failover)
    share_permille: int | None  # the share granted in recovery; None: no loss tracking
    class_permille: int | None  # the priority class's share of each windowed limit; None: all
    ticket: str | None  # the waiter's ticket in the line of its key; None: not waiting
    rank: int  # the class's rank, 0 highest: its place in line before arrival
    classes: int  # how many classes the api has (0 without classes)
    aging_ms: int | None  # a lower class this long without a grant goes first; None: never
    line_wait_ms: int | None  # stay in line if the soonest grant lies within; None: leave
    ticket_ttl_ms: int  # a ticket not refreshed within this leaves the line


@dataclass(frozen=True)
class LeaveArgs(ScriptArgs):
    script: ClassVar[str] = "leave"

    now_ms: int | None
    ticket: str  # the ticket that leaves the line of its key


@dataclass(frozen=True)
class ReleaseArgs(ScriptArgs):
    script: ClassVar[str] = "release"

    now_ms: int | None
    token: str
    outcome: str  # ok | failed | throttled | not_called
    retry_ms: int | None  # the upstream's retry time, for throttled
    runtime_ms: int | None  # the reported run time; None keeps the estimate
    named_amount: int | None  # the limit a throttled answer named: calls ...
    named_window_ms: int | None  # ... per this window
    learn_ttl_ms: int  # how long a learned limit holds
    ran_ms: int | None  # the upstream's own report of its processing; None: not known
    calls: int | None  # the lease's call units that were called; None: all of them
    keep: int | None  # its call units that stay in flight (the lease lives on); None: none


@dataclass(frozen=True)
class RenewArgs(ScriptArgs):
    script: ClassVar[str] = "renew"

    now_ms: int | None
    token: str
    renew_ttl_ms: int  # the lease expires no earlier than now + this


@dataclass(frozen=True)
class UsageArgs(ScriptArgs):
    script: ClassVar[str] = "usage"

    now_ms: int | None


@dataclass(frozen=True)
class ForgetArgs(ScriptArgs):
    script: ClassVar[str] = "forget"

    now_ms: int | None


SCRIPTS: tuple[type[ScriptArgs], ...] = (
    AcquireArgs,
    LeaveArgs,
    ReleaseArgs,
    RenewArgs,
    UsageArgs,
    ForgetArgs,
)


def _lua_table(name: str, fields: dict[str, int]) -> str:
    body = ", ".join(f"{key} = {value}" for key, value in fields.items())
    return f"local {name} = {{{body}}}\n"


def _by_code(codes: dict[str, int]) -> list[str]:
    """The names of `codes` as a Lua array: the name of code i at index i (from 1)."""
    names = sorted(codes, key=lambda name: codes[name])
    assert [codes[name] for name in names] == list(range(1, len(names) + 1))
    return names


def prelude(args: type[ScriptArgs]) -> str:
    """What a script learns of the contract: its ARGV positions (`ARG`), where the policy
    block is (`POLICY_AT`), the names of the kinds' codes (`KINDS`) and the reply codes
    (`REPLY`, `LEARN`)."""
    names = args.names()
    return (
        _lua_table("ARG", {name: at for at, name in enumerate(names, 1)})
        + f"local POLICY_AT = {len(names) + 1}\n"
        + f"local RANK_SPAN = {RANK_SPAN}\n"
        + f"local KINDS = {{{', '.join(repr(name) for name in _by_code(KIND_CODES))}}}\n"
        + _lua_table("REPLY", REPLY_CODES)
        + _lua_table("LEARN", LEARN_CODES)
    )


def script_source(args: type[ScriptArgs]) -> str:
    """The text one EVALSHA runs: the contract's prelude, the shared helpers of
    `lua/lib.lua` whole, then the script."""
    lib = (LUA_DIR / "lib.lua").read_text()
    return prelude(args) + lib + (LUA_DIR / f"{args.script}.lua").read_text()


# ---- KEYS and the policy block -------------------------------------------------------


def redis_keys(tenant: str, api: str, key: str, policy: Policy) -> tuple[str, ...]:
    """KEYS for every quota script: `KEY_LAYOUT`, then one per limit (the layout is
    documented in `lua/lib.lua`)."""
    base = f"qg:{{{tenant}|{api}}}"
    inflight_api, inflight_key = f"{base}:fa", f"{base}:fk:{key}"
    keys = [f"{base}:s", inflight_api, inflight_key, f"{base}:q:{key}", f"{base}:qt:{key}"]
    for lim in policy.limits:
        if lim.kind is Kind.CONCURRENT:
            keys.append(inflight_key if lim.scope is Scope.KEY else inflight_api)
        else:
            # Named by what it counts, so a changed amount keeps its history.
            name = f"{base}:{lim.kind.value[0]}{lim.window_ms}/{lim.granularity_ms}"
            keys.append(f"{name}:k:{key}" if lim.scope is Scope.KEY else name)
    return tuple(keys)


def wake_channel(tenant: str, api: str) -> str:
    """The shard channel on which the scripts wake the waiters of (tenant, api) (lib.lua,
    wake_waiters): the state key with `w` for `s`, so it carries the keys' hash tag."""
    return f"qg:{{{tenant}|{api}}}:w"


def policy_block(policy: Policy) -> tuple[int, ...]:
    """What the policy fixes, closing every quota script's ARGV: `POLICY_FIELDS`, then
    `LIMIT_FIELDS` for each limit, a limit's kind as its code in `KIND_CODES`."""
    head = (
        policy.lease_ttl_ms,
        1 if policy.tracks_api else 0,
        1 if policy.tracks_keys else 0,
        max(policy.longest_window_ms, policy.lease_ttl_ms),
    )
    return head + tuple(
        value
        for lim in policy.limits
        for value in (
            KIND_CODES[lim.kind.value],
            lim.amount,
            lim.window_ms,
            lim.granularity_ms,
            lim.margin_ms,
            lim.amount if lim.assured is None else lim.assured,
        )
    )


def packed_policy_block(policy: Policy) -> bytes:
    """The policy block as the scripts receive it: one argument of signed 64-bit
    little-endian integers, which Lua's `struct.unpack` reads in one call (`read_policy`
    in lib.lua). One argument, because redis-py packs every argument in Python, on the
    coordinator's CPU, for every decision."""
    values = policy_block(policy)
    return struct.pack(f"<{len(values)}q", *values)


# ---- Replies -------------------------------------------------------------------------


def _int(value: Any) -> int:
    return int(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Granted:
    now_ms: int
    expiry_ms: int
    epoch_ms: int  # the state's epoch, to pass as known_epoch next time (0: untracked)
    until_ms: int  # the state is sure to live until then: known_until next time
    written: int  # the writer's grants in the epoch: known_written next time


@dataclass(frozen=True)
class Denied:
    now_ms: int
    retry_ms: int  # the wait if nothing else happens; -1: no wait can ever grant it
    bound: int  # 1-based index of the limit that bound the wait; 0 for the cooldown
    soonest_ms: int  # the wait if every lease in flight were released now
    amount: int  # the bound limit's amount in force (a learned one may be lower)
    epoch_ms: int  # as in Granted
    until_ms: int
    written: int


def decode_acquire(reply: Sequence[Any]) -> Granted | Denied:
    """acquire.lua: {GRANTED, now_ms, expiry_ms, epoch_ms, until_ms, written} | {DENIED,
    now_ms, retry_ms, bound, soonest_ms, amount, epoch_ms, until_ms, written}."""
    code = _int(reply[0])
    if code == GRANTED:
        return Granted(*(_int(value) for value in reply[1:6]))
    if code == DENIED:
        return Denied(*(_int(value) for value in reply[1:9]))
    raise ValueError(f"acquire.lua replied with an unknown code {code}")


@dataclass(frozen=True)
class LeaseReply:
    """release.lua and renew.lua: `found` false with `reason` "unknown" | "expired"."""

    found: bool
    now_ms: int
    expiry_ms: int | None = None  # renew: the new expiry
    reason: str = ""
    learned: Learned | None = None  # release: what became of a named limit
    woke: bool = False  # release: it woke the waiters of its (tenant, api)


@dataclass(frozen=True)
class Learned:
    """What a throttled release did with the limit the upstream named."""

    code: str  # a key of LEARN_CODES
    index: int  # 1-based limit of the policy it concerns; 0 for NO_LIMIT
    amount: int  # the amount in force now (HIGHER: the policy's)
    before: int  # the amount in force before


_LEARN_NAMES = {code: name for name, code in LEARN_CODES.items()}


def decode_release(reply: Sequence[Any]) -> LeaseReply:
    """release.lua: {GRANTED, now_ms, learned, index, amount, before, woke} |
    {DENIED, now_ms, reason}."""
    if _int(reply[0]) == GRANTED:
        code, index, amount, before, woke = (_int(value) for value in reply[2:7])
        learned = None if code == 0 else Learned(_LEARN_NAMES[code], index, amount, before)
        return LeaseReply(True, _int(reply[1]), learned=learned, woke=woke == 1)
    return LeaseReply(False, _int(reply[1]), reason=_text(reply[2]))


def decode_renew(reply: Sequence[Any]) -> LeaseReply:
    """renew.lua: {GRANTED, now_ms, expiry_ms} | {DENIED, now_ms, reason}."""
    if _int(reply[0]) == GRANTED:
        return LeaseReply(True, _int(reply[1]), _int(reply[2]))
    return LeaseReply(False, _int(reply[1]), reason=_text(reply[2]))


@dataclass(frozen=True)
class UsageReply:
    now_ms: int
    cooldown_ms: int
    in_flight: int
    waiting: int  # tickets in the line of the key
    # (used, resets_in_ms, amount in force) per limit, in policy order
    limits: tuple[tuple[int, int, int], ...]


def decode_usage(reply: Sequence[Any]) -> UsageReply:
    """usage.lua: {now_ms, cooldown_ms, in_flight, waiting, used_1, resets_1, amount_1,
    used_2, ...}."""
    rest = [_int(value) for value in reply[4:]]
    triples = tuple(zip(rest[::3], rest[1::3], rest[2::3], strict=True))
    return UsageReply(_int(reply[0]), _int(reply[1]), _int(reply[2]), _int(reply[3]), triples)


def decode_leave(reply: Sequence[Any]) -> bool:
    """leave.lua: {GRANTED, now_ms} when the ticket was in line, {DENIED, now_ms} if not."""
    return _int(reply[0]) == GRANTED


def decode_forget(reply: Sequence[Any]) -> int:
    """forget.lua: {GRANTED, now_ms, forgotten}."""
    return _int(reply[2])


__all__ = [
    "DENIED",
    "GRANTED",
    "KEY_LAYOUT",
    "KIND_CODES",
    "LIMIT_FIELDS",
    "POLICY_FIELDS",
    "RANK_SPAN",
    "SCRIPTS",
    "AcquireArgs",
    "Denied",
    "ForgetArgs",
    "Granted",
    "Learned",
    "LeaseReply",
    "LeaveArgs",
    "ReleaseArgs",
    "RenewArgs",
    "ScriptArgs",
    "UsageArgs",
    "UsageReply",
    "decode_acquire",
    "decode_forget",
    "decode_leave",
    "decode_release",
    "decode_renew",
    "decode_usage",
    "packed_policy_block",
    "policy_block",
    "prelude",
    "redis_keys",
    "script_source",
    "wake_channel",
]
