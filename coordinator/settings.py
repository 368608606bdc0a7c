"""Process settings: every field also reads `QUOTAGATE_<FIELD>` from the environment."""

from __future__ import annotations

import functools
import ipaddress
import json
from pathlib import Path

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TokenMap = dict[str, list[str]]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUOTAGATE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    redis_url: str | None = None  # None: start the embedded server
    policies: Path | None = None  # a policy file on top of the built-in catalog
    data_dir: Path = Path(".quotagate")  # the embedded server's append-only file
    tokens: TokenMap = {}  # bearer token -> tenant globs it may use
    tokens_file: Path | None = None  # the same mapping as a JSON or YAML file
    max_wait: float = Field(60.0, ge=0)  # seconds an acquire may be held at most
    request_timeout: float = Field(2.0, gt=0)  # seconds for one Redis decision
    max_body_bytes: int = Field(64 * 1024, gt=0)
    access_log: bool = False  # one log line per request
    # After the store loses its state: the share of each limit granted until its window
    # no longer overlaps the loss; and whether an empty store at start counts as a loss.
    recovery_share: float = Field(0.5, ge=0, le=1)
    recover_on_start: bool = False

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

    @property
    def loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@functools.cache
def get_settings() -> Settings:
    """The process settings, read once; tests override the dependency."""
    return Settings()
