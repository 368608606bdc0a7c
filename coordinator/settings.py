"""Process settings: every field also reads `QUOTAGATE_<FIELD>` from the environment.

The `quotagate serve` flags are generated from these fields (their descriptions are the
flags' help), and `environment()` hands the effective values to worker processes.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TokenMap = dict[str, list[str]]
ENV_PREFIX = "QUOTAGATE_"
# What the example manifests (deploy/) put where a secret belongs. A token or a store URL
# that contains it is refused at start: manifests applied unedited must not run with a
# secret that anyone can read in this repository.
PLACEHOLDER = re.compile("change-me", re.IGNORECASE)

# A DNS name: labels of letters, digits and hyphens (no port, userinfo or path).
_HOST_NAME = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9-]{1,63}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host.replace(".", "").isdigit()  # 2130706433, 127.1: still addresses
    return True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_by_name=True)

    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8080, ge=0, le=65535, description="port")
    workers: int = Field(
        1,
        ge=1,
        # WEB_CONCURRENCY is what hosting platforms set for the number of worker processes.
        validation_alias=AliasChoices(f"{ENV_PREFIX}WORKERS", "WEB_CONCURRENCY"),
        description="worker processes; they share the port and the store",
    )
    redis_url: str | None = Field(None, description="Redis URL; none starts an embedded server")
    embedded: bool = Field(
        False,
        description="start the embedded server though listening beyond loopback (a private"
        " store: other instances do not share its counts)",
    )
    policies: Path | None = Field(None, description="policy file on top of the built-in catalog")
    data_dir: Path = Field(Path(".quotagate"), description="the embedded server's data")
    tokens: TokenMap = Field(
        {},
        description='bearer token -> tenant globs it may use, {"<token>": ["contoso/*"]}, merged'
        " with the tokens file; prefer the environment or the file (a command line is"
        " visible to other users)",
    )
    tokens_file: Path | None = Field(None, description="the same mapping as a JSON or YAML file")
    max_wait: float = Field(60.0, ge=0, description="seconds an acquire may be held at most")
    request_timeout: float = Field(2.0, gt=0, description="seconds for one Redis decision")
    max_body_bytes: int = Field(64 * 1024, gt=0, description="largest request body accepted")
    access_log: bool = Field(False, description="one log line per request")
    # After the store loses its state: the share of each limit granted until its window
    # no longer overlaps the loss; and whether an empty store at start counts as a loss.
    recovery_share: float = Field(
        0.5, ge=0, le=1, description="share of each limit granted after the store lost state"
    )
    recover_on_start: bool = Field(False, description="treat an empty store at start as a loss")
    learned_ttl: float = Field(
        86_400.0,
        gt=0,
        description="seconds a limit learned from an upstream 429 holds (design rule 8)",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text or as JSON objects, one a line"
    )
    metrics: bool = Field(True, description="count decisions and store calls for /metrics")
    # Every tenant is a label value of its own up to the cap (per worker process); beyond
    # it tenants are counted as `other`, so an MSSP's hundreds of tenants stay bounded.
    metrics_tenant_label: bool = Field(
        True, description="label decision, release and cooldown metrics with the tenant"
    )
    metrics_max_tenants: int = Field(
        100, ge=0, description="tenants labelled by name; the others are counted as `other`"
    )
    index_ttl: float = Field(
        3600.0, gt=0, description="seconds an idle (tenant, api, key) stays in the fleet index"
    )
    index_max: int = Field(10000, gt=0, description="entries the fleet index keeps at most")
    loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="event loop; auto takes uvloop when installed"
    )
    http: Literal["auto", "h11", "httptools"] = Field(
        "auto", description="HTTP parser; auto takes httptools when installed"
    )

    # The gateway (`/gateway/{host}/{path}`): which hosts it forwards to, and where.
    gateway_hosts: list[str] = Field(
        [],
        description="hosts the gateway forwards to besides the route table's Defender and Graph"
        ' hosts, ["api.example.com"]; names only (no IP address, no port)',
    )
    gateway_upstreams: dict[str, str] = Field(
        {},
        description="gateway host -> base URL its requests go to instead of https://{host},"
        ' {"api.security.microsoft.com": "https://egress.example:8443"}',
    )
    gateway_wait: float = Field(
        30.0, ge=0, description="seconds a gateway request waits for its lease by default"
    )
    gateway_unrouted: Literal["pass", "refuse"] = Field(
        "pass",
        description="a gateway request no route matches: pass (uncoordinated, said in the"
        " X-Quotagate header) or refuse (404)",
    )
    gateway_timeout: float = Field(
        300.0, gt=0, description="seconds an upstream may stay silent during a gateway call"
    )
    gateway_connections: int = Field(
        200, ge=1, description="upstream connections the gateway keeps open at most"
    )
    gateway_blocks: bool = Field(
        True,
        description="a busy scope's gateway calls share blocks of call units (one lease of"
        " several, handed out for 0.1 s at most) instead of a lease each; false: one lease"
        " per call",
    )

    @field_validator("gateway_hosts")
    @classmethod
    def _check_gateway_hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not _HOST_NAME.fullmatch(host) or _is_ip(host):
                raise ValueError(f"{host!r}: a gateway host is a DNS name, without port or path")
        return [host.lower() for host in hosts]

    @field_validator("gateway_upstreams")
    @classmethod
    def _check_gateway_upstreams(cls, upstreams: dict[str, str]) -> dict[str, str]:
        for host, base in upstreams.items():
            if not _HOST_NAME.fullmatch(host) or _is_ip(host):
                raise ValueError(f"{host!r}: a gateway host is a DNS name, without port or path")
            scheme, _, rest = base.partition("://")
            if scheme not in ("http", "https") or not rest or "?" in rest or "#" in rest:
                raise ValueError(f"{base!r}: a gateway upstream is an http(s) base URL")
        return {host.lower(): base.rstrip("/") for host, base in upstreams.items()}

    @field_validator("tokens")
    @classmethod
    def _check_tokens(cls, tokens: TokenMap) -> TokenMap:
        for token, globs in tokens.items():
            if len(token) < 16:
                raise ValueError("each token must be at least 16 characters long")
            if not globs:
                raise ValueError("each token needs at least one tenant glob")
        return tokens

    def all_tokens(self) -> TokenMap:
        """Tokens from QUOTAGATE_TOKENS and from the tokens file, merged."""
        merged = dict(self.tokens)
        if self.tokens_file is not None:
            loaded = yaml.safe_load(self.tokens_file.read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict) or not all(
                isinstance(globs, list) and all(isinstance(g, str) for g in globs)
                for globs in loaded.values()
            ):
                raise ValueError(
                    f"{self.tokens_file}: expected a mapping of token -> list of tenant globs, "
                    f"e.g. {json.dumps({'<token>': ['contoso/*']})}"
                )
            merged.update(self._check_tokens({str(k): v for k, v in loaded.items()}))
        return merged

    def placeholders(self) -> list[str]:
        """The settings that still hold the example manifests' placeholder, by flag."""
        found = []
        if any(PLACEHOLDER.search(token) for token in self.tokens):
            found.append("a token of --tokens (QUOTAGATE_TOKENS)")
        if self.tokens_file is not None and any(
            PLACEHOLDER.search(token) for token in self.all_tokens().keys() - self.tokens.keys()
        ):
            found.append(f"a token of --tokens-file {self.tokens_file}")
        if self.redis_url is not None and PLACEHOLDER.search(self.redis_url):
            found.append("--redis-url (QUOTAGATE_REDIS_URL)")
        return found

    @property
    def loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def environment(self) -> dict[str, str | None]:
        """Each field's variable and its value as `Settings()` reads it back, so another
        process (a worker) gets these settings; None: the variable must be unset."""
        values = self.model_dump(mode="json")
        found: dict[str, str | None] = {}
        for name in type(self).model_fields:
            value = values[name]
            secret = getattr(self, name)
            if isinstance(secret, SecretStr):  # dumped masked
                value = secret.get_secret_value()
            if value is None:
                text = None
            elif isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, dict | list):
                text = json.dumps(value)
            else:
                text = str(value)
            found[env_names(name, type(self))[0]] = text
        return found


def env_names(name: str, model: type[Settings] = Settings) -> list[str]:
    """The environment variables a field reads, the one that wins first."""
    alias = model.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str)]
    if isinstance(alias, str):
        return [alias]
    return [f"{ENV_PREFIX}{name.upper()}"]


@functools.cache
def get_settings() -> Settings:
    """The process settings, read once; tests override the dependency."""
    return Settings()
