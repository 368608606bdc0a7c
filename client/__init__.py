"""quotagate client: leases from the coordinator, httpx transports, Defender routes.

from quotagate.client import QuotaClient, QuotaTransport

with QuotaClient("http://quotagate:8080", "contoso/app", token) as quota:
    http = httpx.Client(transport=QuotaTransport(quota))
    http.get("https://api.security.microsoft.com/api/incidents")

`QuotaAdapter` does the same for a `requests.Session` (extra `quotagate[requests]`).
"""

from typing import TYPE_CHECKING, Any

from ._async import AsyncQuotaClient
from ._sync import QuotaClient
from .exceptions import (
    BadRequest,
    CoordinatorUnavailable,
    Forbidden,
    QuotaError,
    QuotaExhausted,
    Unauthorized,
    UnknownApi,
    UnknownLease,
    UnroutedRequest,
)
from .lease import OUTCOMES, Lease, Outcome
from .parsing import (
    Throttle,
    execution_time,
    parse_duration,
    parse_limit,
    parse_retry_after,
    parse_throttle,
    throttle_from_response,
)
from .routes import (
    DEFENDER_HOSTS,
    DEFENDER_ROUTES,
    ENDPOINT,
    GRAPH_HOSTS,
    Route,
    RouteMatch,
    RouteTable,
    endpoint_key,
    normalise_path,
)
from .transport import AsyncQuotaTransport, QuotaTransport

if TYPE_CHECKING:
    from .adapter import QuotaAdapter

__all__ = [
    "DEFENDER_HOSTS",
    "DEFENDER_ROUTES",
    "ENDPOINT",
    "GRAPH_HOSTS",
    "OUTCOMES",
    "AsyncQuotaClient",
    "AsyncQuotaTransport",
    "BadRequest",
    "CoordinatorUnavailable",
    "Forbidden",
    "Lease",
    "Outcome",
    "QuotaAdapter",
    "QuotaClient",
    "QuotaError",
    "QuotaExhausted",
    "QuotaTransport",
    "Route",
    "RouteMatch",
    "RouteTable",
    "Throttle",
    "Unauthorized",
    "UnknownApi",
    "UnknownLease",
    "UnroutedRequest",
    "endpoint_key",
    "execution_time",
    "normalise_path",
    "parse_duration",
    "parse_limit",
    "parse_retry_after",
    "parse_throttle",
    "throttle_from_response",
]


def __getattr__(name: str) -> Any:
    # `requests` is an optional extra: imported when its adapter is first asked for.
    if name == "QuotaAdapter":
        from .adapter import QuotaAdapter

        return QuotaAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
