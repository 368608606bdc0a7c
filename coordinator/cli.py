"""The `quotagate` command: serve, usage, policies.

`serve` takes one flag per field of `Settings`, generated from the model: its help, its
environment variables and its default come from the field, so the two cannot drift.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import json
import logging
import logging.config
import os
import signal
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from .policy import PolicyError, PolicySet, load_policies
from .settings import PLACEHOLDER, Settings, env_names, get_settings

app = typer.Typer(
    help="quotagate: keep a fleet of workers inside throttled APIs.", no_args_is_help=True
)
log = logging.getLogger("quotagate")

# What every worker process runs: the service as its `QUOTAGATE_*` variables describe it.
APP_FACTORY = "quotagate.coordinator.app:app_from_environment"
SERVER_EXTRA = "pip install 'quotagate[server]'"
TOKENS_HELP = (
    'set QUOTAGATE_TOKENS=\'{"<token>": ["<tenant glob>", ...]}\' or pass --tokens-file FILE '
    "(the same mapping in JSON or YAML)"
)
STORE_HELP = (
    "set QUOTAGATE_REDIS_URL (--redis-url URL) to the store that every instance shares, or"
    " pass --embedded (QUOTAGATE_EMBEDDED=true) to run this one instance on its own"
    " embedded server"
)
# Types a flag parses itself. A container (mapping, list, model) is given as JSON, as its
# environment variable is; any other type as text, for the settings model to parse.
PLAIN_TYPES = (str, int, float, bool, Path)
CONTAINERS = (dict, list, set, frozenset, tuple, BaseModel)
F = TypeVar("F", bound=Callable[..., None])


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(2)


def _version(shown: bool) -> None:
    if shown:
        typer.echo(f"quotagate {importlib.metadata.version('quotagate')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    pass


def _bare(field: FieldInfo) -> Any:
    """The field's type without its `| None`."""
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def _plain_type(field: FieldInfo) -> Any:
    """The field's type when a flag parses it itself, else None (given as text)."""
    bare = _bare(field)
    if bare in PLAIN_TYPES or typing.get_origin(bare) is typing.Literal:
        return bare
    return None


def _is_json(field: FieldInfo) -> bool:
    outer = typing.get_origin(_bare(field)) or _bare(field)
    return isinstance(outer, type) and issubclass(outer, CONTAINERS)


def settings_flags(command: F, model: type[Settings] = Settings) -> F:
    """Give `command(ctx, **flags)` one flag per settings field, with the field's help,
    environment variables and default (shown; a flag left out leaves the field to the
    model). `settings_from_flags` makes the settings."""
    context = inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )
    parameters = [context]
    for name, field in model.model_fields.items():
        plain = _plain_type(field)
        default = field.get_default(call_default_factory=True)
        flag = "--" + name.replace("_", "-")
        if plain is bool:
            flag += f"/--no-{flag[2:]}"
        shown: bool | str = True
        if plain is not None and default is not None:
            annotation = plain
        else:  # no default, or one that the model parses from text: the model fills it in
            annotation = (plain or str) | None
            shown = default is not None and not _is_json(field) and str(default)
            default = None
        option = typer.Option(
            default,
            flag,
            help=(field.description or name.replace("_", " "))
            + (" (JSON)" if _is_json(field) else ""),
            envvar=names[0] if len(names := env_names(name, model)) == 1 else names,
            show_envvar=True,
            show_default=shown,
            rich_help_panel="Settings",
        )
        parameters.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
            )
        )
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return command


def settings_from_flags(
    ctx: typer.Context, flags: dict[str, Any], model: type[Settings] = Settings
) -> Settings:
    """The settings: the flags given on the command line, else what the model reads (the
    environment, the defaults). Flags read the environment too, but only to check it."""
    given = {}
    for name, value in flags.items():
        source = ctx.get_parameter_source(name)
        if value is None or source is None or source.name != "COMMANDLINE":
            continue
        field = model.model_fields[name]
        if _is_json(field) and field.annotation is not None:
            try:
                value = TypeAdapter(field.annotation).validate_json(value)
            except ValidationError as exc:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag}: {exc.errors()[0]['msg']}") from exc
        given[name] = value
    return model(**given)


def _settings_error(exc: ValidationError, model: type[Settings] = Settings) -> str:
    """One line per bad setting, naming its flag and variables."""
    lines = []
    for error in exc.errors():
        where = str(error["loc"][0]) if error["loc"] else ""
        for name in model.model_fields:
            if where == name or where in env_names(name, model):
                where = f"--{name.replace('_', '-')} ({', '.join(env_names(name, model))})"
        lines.append(f"{where}: {error['msg']}")  # not the value: it may be a token
    return "bad settings: " + "; ".join(lines)


def _log_config(log_format: str = "text") -> dict[str, Any]:
    """The logging configuration of the parent and of every worker (`logs.config`)."""
    from .logs import config

    return config(log_format)


def _metrics_dir(settings: Settings) -> None:
    """With several workers, prometheus-client's multiprocess mode: each worker writes its
    values to files in one directory, and `/metrics` adds them up. The directory (the
    environment's `PROMETHEUS_MULTIPROC_DIR`, else one under the data directory) is
    emptied first: values of an earlier run must not be counted again."""
    from .metrics import MULTIPROC_ENV

    given = os.environ.get(MULTIPROC_ENV)
    if not given and settings.workers == 1:
        return
    folder = Path(given) if given else settings.data_dir / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(folder.resolve())


def _stack_choice(setting: str, fast: str, fallback: str, flag: str) -> str:
    """uvicorn's loop or HTTP implementation: `auto` takes the fast one when installed."""
    installed = importlib.util.find_spec(fast) is not None
    if setting == "auto":
        return fast if installed else fallback
    if setting == fast and not installed:
        raise _fail(f"{flag} {fast} needs the {fast} package: {SERVER_EXTRA}")
    return setting


def _refuse_unsafe(settings: Settings, tokens: dict[str, list[str]]) -> None:
    """Configurations that would start but run wrong: a secret nobody replaced, an open
    port without tokens, or instances that each count in a private store."""
    if placeholders := settings.placeholders():
        raise _fail(
            f"refusing to start: the example manifests' placeholder '{PLACEHOLDER.pattern}'"
            f" is still in {' and '.join(placeholders)}; replace it with the real value (a"
            " token or a password: long and random, e.g. `openssl rand -hex 32`)"
        )
    if not tokens and not settings.loopback_only:
        raise _fail(f"refusing to listen on {settings.host} without tokens: {TOKENS_HELP}")
    if settings.embedded and settings.redis_url is not None:
        raise _fail("--embedded starts a store of its own: give it or --redis-url, not both")
    if settings.redis_url is None and not settings.embedded and not settings.loopback_only:
        raise _fail(
            f"refusing to listen on {settings.host} without a store URL (each instance"
            f" would keep its own budget): {STORE_HELP}"
        )


def _export(settings: Settings) -> None:
    """Put the settings where every worker's `get_settings()` reads them."""
    for name, value in settings.environment().items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    get_settings.cache_clear()


@app.command()
@settings_flags
def serve(ctx: typer.Context, **flags: Any) -> None:
    """Run the coordinator.

    Every flag also reads its environment variable; a flag on the command line wins.
    """
    import uvicorn

    from .embedded import EmbeddedServer, EmbeddedServerError

    logging.config.dictConfig(_log_config())
    try:
        settings = settings_from_flags(ctx, flags)
        effective: PolicySet = load_policies(settings.policies)
        tokens = settings.all_tokens()
    except ValidationError as exc:
        raise _fail(_settings_error(exc)) from exc
    except (PolicyError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    logging.config.dictConfig(_log_config(settings.log_format))
    _refuse_unsafe(settings, tokens)
    loop = _stack_choice(settings.loop, "uvloop", "asyncio", "--loop")
    http = _stack_choice(settings.http, "httptools", "h11", "--http")

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
    _export(settings)
    _metrics_dir(settings)
    log.info(
        "%d apis, tokens %s, %d worker%s, loop %s, http %s",
        len(effective.apis),
        "on" if tokens else "off (loopback only)",
        settings.workers,
        "" if settings.workers == 1 else "s",
        loop,
        http,
    )
    if embedded is not None:
        # uvicorn raises the signal that stopped it again once it has shut down; as an
        # exception here, it still lets the embedded server stop with the coordinator.
        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, _exit_on_signal)
    try:
        uvicorn.run(
            APP_FACTORY,
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            loop=loop,
            http=http,
            log_config=_log_config(settings.log_format),
            log_level="info",
            access_log=settings.access_log,
        )
    finally:
        if embedded is not None:
            embedded.stop()


def _exit_on_signal(number: int, frame: object) -> None:
    raise SystemExit(0)  # uvicorn has shut down gracefully already


def _bar(used: float, amount: float, width: int = 20) -> str:
    filled = min(width, round(width * used / amount)) if amount else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _limit_text(limit: dict[str, Any]) -> str:
    if limit["kind"] == "concurrent":
        return f"concurrent {limit['amount']:g}"
    unit = "s run time" if limit["kind"] == "runtime" else "calls"
    text = f"{limit['amount']:g} {unit} / {limit['window']:g} s"
    configured = limit.get("configured", limit["amount"])
    if configured != limit["amount"]:  # a limit learned from the upstream's 429s
        text += f" (learned; policy {configured:g})"
    return text


def _usage_rows(http: Any, tenant: str | None, api: str | None, key: str | None) -> list[Any]:
    """Usage replies: one api of a tenant, a tenant's active apis, or every active one."""
    if tenant is None:
        path = "/v1/usage"
    elif api is None:
        path = f"/v1/usage/{tenant}/"  # the trailing slash: all of the path is the tenant
    else:
        path = f"/v1/usage/{tenant}/{api}"
    reply = http.get(path, params={"key": key} if key else {})
    if reply.status_code != 200:
        raise _fail(f"{api or tenant or 'usage'}: {reply.status_code} {reply.text}")
    found = reply.json()
    return [found] if api is not None else list(found["items"])


def _print_rows(rows: list[Any]) -> None:
    tenants = {row["tenant"] for row in rows}
    shown = None
    for row in rows:
        if len(tenants) > 1 and row["tenant"] != shown:
            shown = row["tenant"]
            typer.echo(f"== {shown}")
        key = f" [{row['key']}]" if row.get("key") else ""
        cooldown = f"  cooling down {row['cooldown']:g} s" if row["cooldown"] else ""
        waiting = f"  waiting {row['waiting']}" if row.get("waiting") else ""
        typer.echo(f"{row['api']}{key}  in flight {row['in_flight']}{waiting}{cooldown}")
        for lim in row["limits"]:
            typer.echo(
                f"  {_limit_text(lim):<28} {_bar(lim['used'], lim['amount'])} "
                f"{lim['used']:>8g} used {lim['remaining']:>8g} left "
                f" resets in {lim['resets_in']:g} s"
            )


def usage_view(rows: list[Any], source: str) -> Any:
    """The live view of `usage --watch`: one table, a row per limit, bars in colour."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    table = Table(title=f"quotagate usage · {source}", expand=True, title_justify="left")
    for column in ("tenant", "api", "limit", "used", "", "left", "resets in", "in flight"):
        table.add_column(column, no_wrap=True, ratio=2 if column == "" else None)
    for row in rows:
        name = row["api"] + (f" [{row['key']}]" if row.get("key") else "")
        state = f"{row['in_flight']}" + (
            f" · {row['waiting']} waiting" if row.get("waiting") else ""
        )
        if row["cooldown"]:
            state += f" · [bold red]paused {row['cooldown']:.0f} s[/]"
        for n, lim in enumerate(row["limits"]):
            full = lim["amount"] and lim["used"] >= lim["amount"]
            bar = ProgressBar(
                total=lim["amount"] or 1,
                completed=min(lim["used"], lim["amount"]),
                complete_style="red" if full else "green",
            )
            table.add_row(
                row["tenant"] if n == 0 else "",
                name if n == 0 else "",
                _limit_text(lim),
                f"{lim['used']:g}",
                bar,
                f"{lim['remaining']:g}",
                f"{lim['resets_in']:.0f} s" if lim["resets_in"] else "",
                state if n == 0 else "",
            )
    if not rows:
        table.caption = "no active tenant"
    return table


@app.command()
def usage(
    tenant: Annotated[
        str | None, typer.Argument(help="one tenant; every active one when left out")
    ] = None,
    api: Annotated[
        str | None, typer.Argument(help="one api; its active ones when left out")
    ] = None,
    key: Annotated[str | None, typer.Option(help="the key inside the api")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="a live view, until Ctrl-C")] = False,
    interval: Annotated[float, typer.Option(help="seconds between two updates of --watch")] = 1.0,
    url: Annotated[str, typer.Option(envvar="QUOTAGATE_URL")] = "http://127.0.0.1:8080",
    token: Annotated[str | None, typer.Option(envvar="QUOTAGATE_TOKEN", show_default=False)] = None,
) -> None:
    """Show what tenants have used, as a table with bars: one api of a tenant, a tenant's
    active apis, or every active tenant the token may see."""
    import httpx  # here, not at the top: with rich installed it loads its own CLI, slowly

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
        try:
            if not watch:
                _print_rows(_usage_rows(http, tenant, api, key))
                return
            import time

            from rich.live import Live

            source = " ".join(part for part in (url, tenant, api) if part)
            with Live(usage_view([], source), auto_refresh=False) as live:
                while True:
                    rows = _usage_rows(http, tenant, api, key)
                    live.update(usage_view(rows, source), refresh=True)
                    time.sleep(interval)
        except httpx.HTTPError as exc:
            raise _fail(f"cannot reach the coordinator at {url}: {exc}") from exc
        except KeyboardInterrupt:
            pass


@app.command()
def forget(
    tenant: str,
    api: str,
    url: Annotated[str, typer.Option(envvar="QUOTAGATE_URL")] = "http://127.0.0.1:8080",
    token: Annotated[str | None, typer.Option(envvar="QUOTAGATE_TOKEN", show_default=False)] = None,
) -> None:
    """Forget the limits a tenant's api learned from the upstream's 429s."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        reply = httpx.delete(f"{url}/v1/learned/{tenant}/{api}", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the coordinator at {url}: {exc}") from exc
    if reply.status_code != 200:
        raise _fail(f"{api}: {reply.status_code} {reply.text}")
    typer.echo(f"{tenant} {api}: {reply.json()['forgotten']} learned limit(s) forgotten")


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
