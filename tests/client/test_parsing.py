"""Every throttled answer and Stats shape quoted in coordinator/defender.md ("Throttled
answers", "Advanced hunting answers"), and their parts."""

from __future__ import annotations

import json

import httpx
import pytest

from quotagate.client import (
    execution_time,
    parse_duration,
    parse_limit,
    parse_retry_after,
    parse_throttle,
    throttle_from_response,
)

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z

MDE_PLAIN = (
    '{"error":{"code":"429","message":"API calls quota exceeded! maximum allowed 45 per '
    '00:01:00","target":"7c2b"}}'
)
MDE_WITH_RETRY = (
    '{"error":{"code":"429","message":"API calls quota exceeded! Maximum allowed 30 per '
    "00:01:00 for the key Destination+TenantID+AppID. You can send requests again in 8 "
    'seconds.","target":"7c2b"}}'
)
MDE_DOCUMENTED = '{"error":{"code":"TooManyRequests","message":"Too many requests."}}'
GRAPH = (
    '{"error":{"code":"TooManyRequests","message":"Please retry again later.",'
    '"innerError":{"code":"429","date":"2024-01-01T00:00:00","request-id":"r1"}}}'
)


def hunting_cpu(duration: str) -> str:
    message = (
        "You have exceeded processing resources allocated to this tenant. "
        f"You can run queries again in {duration}."
    )
    return json.dumps({"error": {"code": "TooManyRequests", "message": message}})


STATS = {
    "Stats": {
        "ExecutionTime": 4.621215,
        "resource_usage": {
            "cpu": {
                "user": "00:00:19.0468750",
                "kernel": "00:00:00.0156250",
                "total cpu": "00:00:19.0625000",
            },
            "memory": {"peak_per_node": 236822432},
            "cache": {"memory": {"hits": 1, "misses": 0, "total": 1}},
        },
        "dataset_statistics": [{"table_row_count": 2, "table_size": 102}],
    },
    "Schema": [{"Name": "Timestamp", "Type": "DateTime"}],
    "Results": [{"Timestamp": "2024-01-01T00:00:00Z"}],
}


class TestDurations:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("00:00:37", 37.0),
            ("00:01:00", 60.0),
            ("01:02:03", 3723.0),
            ("00:00:19.0468750", 19.046875),
            ("1.00:00:00", 86400.0),
            ("37 seconds", 37.0),
            ("1 second", 1.0),
            ("8 seconds", 8.0),
            ("1 minute", 60.0),
            ("2 minutes", 120.0),
            ("1 minute 30 seconds", 90.0),
            ("1 minute and 30 seconds", 90.0),
            ("1 hour", 3600.0),
            ("1.5 seconds", 1.5),
            ("500ms", 0.5),
            ("1m", 60.0),
            ("4h", 14400.0),
            ("1d", 86400.0),
            ("37", 37.0),
        ],
    )
    def test_spellings(self, text: str, seconds: float) -> None:
        assert parse_duration(text) == pytest.approx(seconds)

    @pytest.mark.parametrize("text", ["", "soon", "later", "1 fortnight", "1:2"])
    def test_nonsense_is_none(self, text: str) -> None:
        assert parse_duration(text) is None


class TestRetryAfterHeader:
    @pytest.mark.parametrize(("value", "seconds"), [("2.128", 2.128), ("8", 8.0), ("0", 0.0)])
    def test_seconds(self, value: str, seconds: float) -> None:
        assert parse_retry_after(value) == pytest.approx(seconds)

    def test_http_date(self) -> None:
        assert parse_retry_after("Tue, 14 Nov 2023 22:13:50 GMT", now=NOW) == pytest.approx(30)

    def test_http_date_in_the_past_is_zero(self) -> None:
        assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now=NOW) == 0.0

    @pytest.mark.parametrize("value", ["", "soon", "-1", "nan", "inf"])
    def test_invalid_is_none(self, value: str) -> None:
        assert parse_retry_after(value) is None


class TestLimitNamed:
    def test_lower_case(self) -> None:
        assert parse_limit("API calls quota exceeded! maximum allowed 45 per 00:01:00") == (45, 60)

    def test_capitalised_with_more_text(self) -> None:
        message = json.loads(MDE_WITH_RETRY)["error"]["message"]
        assert parse_limit(message) == (30, 60)

    def test_absent(self) -> None:
        assert parse_limit("Please retry again later.") is None


class TestThrottledAnswers:
    def test_mde_limit_without_retry_time(self) -> None:
        throttle = parse_throttle(429, {}, MDE_PLAIN)
        assert throttle is not None
        assert (throttle.code, throttle.calls, throttle.window) == ("429", 45, 60.0)
        assert throttle.retry_after is None

    def test_mde_limit_with_retry_time_in_body(self) -> None:
        throttle = parse_throttle(429, {}, MDE_WITH_RETRY.encode())
        assert throttle is not None
        assert (throttle.retry_after, throttle.calls, throttle.window) == (8.0, 30, 60.0)

    def test_header_wins_over_body(self) -> None:
        throttle = parse_throttle(429, {"Retry-After": "3"}, MDE_WITH_RETRY)
        assert throttle is not None and throttle.retry_after == 3.0

    def test_documented_code_too_many_requests(self) -> None:
        throttle = parse_throttle(429, {"Retry-After": "5"}, MDE_DOCUMENTED)
        assert throttle is not None
        assert (throttle.code, throttle.retry_after) == ("TooManyRequests", 5.0)

    def test_graph_fractional_retry_after(self) -> None:
        throttle = parse_throttle(429, httpx.Headers({"Retry-After": "2.128"}), GRAPH)
        assert throttle is not None
        assert (throttle.code, throttle.retry_after) == ("TooManyRequests", 2.128)
        assert throttle.message == "Please retry again later."

    def test_graph_http_date_retry_after(self) -> None:
        headers = {"Retry-After": "Tue, 14 Nov 2023 22:13:25 GMT"}
        throttle = parse_throttle(429, headers, GRAPH, now=NOW)
        assert throttle is not None and throttle.retry_after == pytest.approx(5)

    @pytest.mark.parametrize(
        ("duration", "seconds"),
        [("00:00:37", 37), ("01:00:00", 3600), ("37 seconds", 37), ("1 minute", 60)],
    )
    def test_hunting_cpu_quota(self, duration: str, seconds: float) -> None:
        throttle = parse_throttle(429, {}, hunting_cpu(duration))
        assert throttle is not None and throttle.retry_after == pytest.approx(seconds)

    def test_hunting_cpu_quota_as_plain_text(self) -> None:
        text = json.loads(hunting_cpu("00:00:37"))["error"]["message"]
        throttle = parse_throttle(429, {}, text)
        assert throttle is not None and throttle.retry_after == 37

    @pytest.mark.parametrize("body", [MDE_PLAIN, GRAPH, MDE_DOCUMENTED])
    def test_throttle_codes_count_without_status_429(self, body: str) -> None:
        assert parse_throttle(400, {}, body) is not None

    @pytest.mark.parametrize(
        "message",
        [
            "Query execution has exceeded the allowed result size",
            "The query execution was preempted. This could possibly be due to high CPU "
            "and/or memory resource consumption.",
        ],
    )
    def test_not_retryable_400_is_no_throttle(self, message: str) -> None:
        body = json.dumps({"error": {"code": "BadRequest", "message": message}})
        assert parse_throttle(400, {}, body) is None

    def test_ok_answer_is_no_throttle(self) -> None:
        assert parse_throttle(200, {}, b'{"value": []}') is None

    def test_429_with_empty_body(self) -> None:
        throttle = parse_throttle(429, {}, b"")
        assert throttle is not None and throttle.retry_after is None

    def test_from_response(self) -> None:
        response = httpx.Response(429, text=MDE_WITH_RETRY)
        throttle = throttle_from_response(response)
        assert throttle is not None and throttle.retry_after == 8.0


class TestExecutionTime:
    def test_stats_shape_from_the_docs(self) -> None:
        assert execution_time(json.dumps(STATS).encode()) == pytest.approx(4.621215)

    def test_text_and_mapping(self) -> None:
        assert execution_time(json.dumps(STATS)) == pytest.approx(4.621215)
        assert execution_time(STATS) == pytest.approx(4.621215)

    def test_graph_run_hunting_query_has_none(self) -> None:
        body = {"schema": [{"name": "Timestamp", "type": "DateTime"}], "results": []}
        assert execution_time(json.dumps(body)) is None

    @pytest.mark.parametrize(
        "body",
        [b"", b"not json", b'{"Stats": 1}', b'{"Stats": {"ExecutionTime": "x"}}', b"[1]"],
    )
    def test_malformed_is_none(self, body: bytes) -> None:
        assert execution_time(body) is None
