"""The `quotagate` command: serve, usage, policies."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from .policy import PolicyError, PolicySet, load_policies
from .settings import Settings

app = typer.Typer(
    help="quotagate: keep a fleet of workers inside throttled APIs.", no_args_is_help=True
)
log = logging.getLogger("quotagate")

TOKENS_HELP = (
    'set QUOTAGATE_TOKENS=\'{"<token>": ["<tenant glob>", ...]}\' or pass --tokens-file FILE '
    "(the same mapping in JSON or YAML)"
)


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(2)


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="bind address [QUOTAGATE_HOST, 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(help="port [QUOTAGATE_PORT, 8080]")] = None,
    policies: Annotated[
        Path | None, typer.Option(help="policy file on top of the catalog [QUOTAGATE_POLICIES]")
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(help="Redis URL; none starts an embedded server [QUOTAGATE_REDIS_URL]"),
    ] = None,
    tokens_file: Annotated[
        Path | None,
        typer.Option(help="token -> tenant globs, JSON or YAML [QUOTAGATE_TOKENS_FILE]"),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="embedded server data [QUOTAGATE_DATA_DIR, .quotagate]")
    ] = None,
) -> None:
    """Run the coordinator."""
    import uvicorn

    from .app import create_app
    from .embedded import EmbeddedServer, EmbeddedServerError

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    given: dict[str, Any] = {
        "host": host,
        "port": port,
        "policies": policies,
        "redis_url": redis_url,
        "tokens_file": tokens_file,
        "data_dir": data_dir,
    }
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
        effective = load_policies(settings.policies)
        tokens = settings.all_tokens()
    except (PolicyError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    if not tokens and not settings.loopback_only:
        raise _fail(f"refusing to listen on {settings.host} without tokens: {TOKENS_HELP}")

    embedded = None
    if settings.redis_url is None:
        try:
            embedded = EmbeddedServer(data_dir=settings.data_dir / "redis").start()
        except EmbeddedServerError as exc:
            raise _fail(str(exc)) from exc
        log.info(
            "embedded server %s at %s, append-only data in %s",
            embedded.binary.name,
            embedded.url,
            (settings.data_dir / "redis").resolve(),
        )
        settings = settings.model_copy(update={"redis_url": embedded.url})
    log.info("%d apis, tokens %s", len(effective.apis), "on" if tokens else "off (loopback only)")
    try:
        uvicorn.run(
            create_app(settings, policies=effective),
            host=settings.host,
            port=settings.port,
            log_level="info",
            access_log=settings.access_log,
        )
    finally:
        if embedded is not None:
            embedded.stop()


def _bar(used: float, amount: float, width: int = 20) -> str:
    filled = min(width, round(width * used / amount)) if amount else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _limit_text(limit: dict[str, Any]) -> str:
    if limit["kind"] == "concurrent":
        return f"concurrent {limit['amount']:g}"
    unit = "s run time" if limit["kind"] == "runtime" else "calls"
    return f"{limit['amount']:g} {unit} / {limit['window']:g} s"


@app.command()
def usage(
    tenant: str,
    api: Annotated[str | None, typer.Argument(help="one api; all of them when left out")] = None,
    key: Annotated[str | None, typer.Option(help="the key inside the api")] = None,
    url: Annotated[str, typer.Option(envvar="QUOTAGATE_URL")] = "http://127.0.0.1:8080",
    token: Annotated[str | None, typer.Option(envvar="QUOTAGATE_TOKEN", show_default=False)] = None,
) -> None:
    """Show what a tenant has used, as a table with bars."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
        try:
            apis = [api] if api else sorted(http.get("/v1/policies").json()["policies"])
            rows = []
            for name in apis:
                reply = http.get(f"/v1/usage/{tenant}/{name}", params={"key": key} if key else {})
                if reply.status_code != 200:
                    raise _fail(f"{name}: {reply.status_code} {reply.text}")
                rows.append(reply.json())
        except httpx.HTTPError as exc:
            raise _fail(f"cannot reach the coordinator at {url}: {exc}") from exc
    for row in rows:
        cooldown = f"  cooling down {row['cooldown']:g} s" if row["cooldown"] else ""
        typer.echo(f"{row['api']}  in flight {row['in_flight']}{cooldown}")
        for lim in row["limits"]:
            typer.echo(
                f"  {_limit_text(lim):<28} {_bar(lim['used'], lim['amount'])} "
                f"{lim['used']:>8g} used {lim['remaining']:>8g} left "
                f" resets in {lim['resets_in']:g} s"
            )


@app.command()
def policies(
    check: Annotated[
        Path | None, typer.Option("--check", help="validate this policy file (with the catalog)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print the effective policies: the built-in catalog plus a policy file."""
    try:
        effective: PolicySet = load_policies(check)
    except PolicyError as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(effective.describe(), indent=2))
        return
    for name, policy in sorted(effective.apis.items()):
        limits = ", ".join(
            _limit_text(lim) + (" per key" if lim["scope"] == "key" else "")
            for lim in policy.describe()["limits"]
        )
        typer.echo(f"{name:<30} {limits}")
    for pattern, overrides in effective.tenants:
        for name, policy in overrides.items():
            limits = ", ".join(_limit_text(lim) for lim in policy.describe()["limits"])
            typer.echo(f"{name:<30} {limits}  (tenants {pattern})")
    if check is not None:
        typer.secho(f"{check}: ok", fg=typer.colors.GREEN)


def main() -> None:
    app()
