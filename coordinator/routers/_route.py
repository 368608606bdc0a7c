"""The route class of the acquire and release routes, which every upstream call passes.

FastAPI's request handler parses a JSON body with `json.loads`, then solves the route's
parameters and validates them one by one. `JSONBodyRoute` keeps that handler for
everything but the common case: a body sent as `application/json` that the route's model
accepts, which pydantic validates straight from the bytes and hands to the endpoint. A
body the model refuses, or any other content type, goes to FastAPI's own handler (which
reads the same, cached, body again), so every refusal is the one FastAPI gives. pydantic's
parser refuses whatever `json.loads` refuses (and a little more, such as a byte order
mark, which then goes the usual way), so a body accepted here is one FastAPI accepts too,
as the same model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
JSON = "application/json"


class JSONBodyRoute(APIRoute):
    """An APIRoute with the fast path above, for endpoints that take exactly a required
    body model, `request` and string path parameters, and return a Response; any other
    endpoint keeps FastAPI's handler alone."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        plan = _plan(self)
        if plan is None:
            return handler
        model, name, endpoint = plan

        async def validated(request: Request) -> Response:
            if request.headers.get("content-type") != JSON:
                return await handler(request)
            try:
                body = model.model_validate_json(await request.body())
            except ValidationError:
                return await handler(request)
            response: Response = await endpoint(
                request=request, **{name: body}, **request.path_params
            )
            return response

        return validated


def _plan(route: APIRoute) -> tuple[type[BaseModel], str, Callable[..., Any]] | None:
    """(the body model, its parameter's name, the endpoint) when the fast path applies."""
    dependant = route.dependant
    if (
        dependant.dependencies
        or dependant.query_params
        or dependant.header_params
        or dependant.cookie_params
        or len(dependant.body_params) != 1
        or dependant.request_param_name != "request"
        or route.response_field is not None
        or not inspect.iscoroutinefunction(route.endpoint)
    ):
        return None
    body = dependant.body_params[0]
    model = body.field_info.annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    if not body.field_info.is_required():
        return None
    if any(param.field_info.annotation is not str for param in dependant.path_params):
        return None
    return model, body.name, route.endpoint


__all__ = ["JSONBodyRoute"]
