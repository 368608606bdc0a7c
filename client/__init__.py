"""quotagate client: leases from the coordinator, httpx transports, Defender routes.

from quotagate.client import QuotaClient, QuotaTransport

with QuotaClient("http://quotagate:8080", "contoso/app", token) as quota:
    http = httpx.Client(transport=QuotaTransport(quota))
    http.get("https://api.security.microsoft.com/api/incidents")
"""

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
)
from .transport import AsyncQuotaTransport, QuotaTransport

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
    "endpoint_key",
    "execution_time",
    "parse_duration",
    "parse_limit",
    "parse_retry_after",
    "parse_throttle",
    "throttle_from_response",
]
