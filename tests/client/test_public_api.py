"""The names `quotagate.client` exports are part of its contract."""

import quotagate.client

EXPECTED = [
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


def test_all_is_pinned() -> None:
    assert quotagate.client.__all__ == EXPECTED


def test_every_name_is_there() -> None:
    for name in EXPECTED:
        assert getattr(quotagate.client, name) is not None


def test_exceptions_share_one_base() -> None:
    for name in EXPECTED:
        value = getattr(quotagate.client, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, quotagate.client.QuotaError)
