"""The HTTP API's routes: a request's method and path to its handler, its path parameters and its label.

tokenvault/api/http.py registers the routes and runs every request through
one dispatch (``HttpApp``), served by tokenvault/api/httpserver.py.

A pattern is a path with ``{name}`` segments (any non-empty text without ``/``)
or ``{name:a|b}`` segments (one of the listed words). Paths are matched
percent-decoded, except that ``%2F`` and ``%25`` stay
encoded while matching, so a parameter never spans segments; the parameter's
value is then decoded. No trailing-slash or case folding: another spelling of
a path is a 404. A GET route also answers HEAD (the response without its body)
unless registered with ``allow_head=False``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from tokenvault.api.httpserver import AnyResponse, Request

Handler = Callable[[Request], Awaitable[AnyResponse]]

_PARAMETER = re.compile(r"\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<choices>[A-Za-z0-9_|-]+))?\}")


# Per request: the parameters of its route's pattern, set by the dispatch (tokenvault/api/http.py).
PATH_PARAMETERS = "tokenvault.path_parameters"


def path_parameter(request: Request, name: str) -> str:
    """A parameter of the request's route pattern (``{key_id}`` in ``/v1/admin/keys/{key_id}/revoke``)."""
    parameters: dict[str, str] = request[PATH_PARAMETERS]
    return parameters[name]


class RouteNotFound(Exception):
    """No route has this path (404)."""


class MethodNotAllowed(Exception):
    """The path has routes, none for this method (405); ``allowed`` for the Allow header."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        super().__init__("method not allowed")
        self.allowed = allowed


class Match(NamedTuple):
    """A resolved request: the handler, the path's parameters and the route's pattern (the metrics' label).
    A tuple: one is made per request."""

    handler: Handler
    parameters: dict[str, str]
    pattern: str


@dataclass
class _Route:
    pattern: str
    regex: re.Pattern[str] | None  # None for a path without parameters
    handlers: dict[str, Handler] = field(default_factory=dict)


def _compile(pattern: str) -> re.Pattern[str] | None:
    if "{" not in pattern:
        return None
    parts: list[str] = []
    position = 0
    for parameter in _PARAMETER.finditer(pattern):
        parts.append(re.escape(pattern[position:parameter.start()]))
        choices = parameter.group("choices")
        body = "|".join(re.escape(choice) for choice in choices.split("|")) if choices else "[^{}/]+"
        parts.append(f"(?P<{parameter.group('name')}>{body})")
        position = parameter.end()
    rest = pattern[position:]
    if "{" in rest or "}" in rest:
        raise ValueError(f"malformed route pattern {pattern!r}")
    parts.append(re.escape(rest))
    return re.compile("".join(parts) + r"\Z")


def _decoded(value: str) -> str:
    # What stays encoded while matching (Request.path_safe) is decoded in the parameter's value.
    return value.replace("%2F", "/").replace("%2f", "/").replace("%25", "%")


class Router:
    """Routes by exact path first (a dict), then by pattern in the order they were added."""

    def __init__(self) -> None:
        self._plain: dict[str, _Route] = {}
        self._patterns: list[_Route] = []

    def add(self, method: str, pattern: str, handler: Handler, *, allow_head: bool = True) -> None:
        route = self._plain.get(pattern) or next((known for known in self._patterns if known.pattern == pattern),
                                                  None)
        if route is None:
            route = _Route(pattern, _compile(pattern))
            if route.regex is None:
                self._plain[pattern] = route
            else:
                self._patterns.append(route)
        for name in (method, "HEAD") if method == "GET" and allow_head else (method,):
            if name in route.handlers:
                raise ValueError(f"{name} {pattern} is routed twice")
            route.handlers[name] = handler

    def add_get(self, pattern: str, handler: Handler, *, allow_head: bool = True) -> None:
        self.add("GET", pattern, handler, allow_head=allow_head)

    def add_post(self, pattern: str, handler: Handler) -> None:
        self.add("POST", pattern, handler)

    def resolve(self, method: str, path: str) -> Match:
        """The match for ``path`` (``Request.path_safe``: decoded but for %2F and %25);
        RouteNotFound or MethodNotAllowed."""
        route = self._plain.get(path)
        parameters: dict[str, str] = {}
        if route is None:
            for candidate in self._patterns:
                assert candidate.regex is not None
                found = candidate.regex.match(path)
                if found is not None:
                    route = candidate
                    parameters = {name: _decoded(value) for name, value in found.groupdict().items()}
                    break
            else:
                raise RouteNotFound(path)
        handler = route.handlers.get(method)
        if handler is None:
            raise MethodNotAllowed(tuple(sorted(route.handlers)))
        return Match(handler, parameters, route.pattern)
