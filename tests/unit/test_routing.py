"""The HTTP API's route table (tokenvault/api/routing.py): exact paths, patterns, methods, HEAD."""

from __future__ import annotations

import pytest

from tokenvault.api.routing import MethodNotAllowed, RouteNotFound, Router


async def first(request: object) -> object:
    return "first"


async def second(request: object) -> object:
    return "second"


def router() -> Router:
    routes = Router()
    routes.add_get("/v1/admin/keys", first)
    routes.add_post("/v1/admin/keys", second)
    routes.add_post("/v1/admin/keys/{key_id}/revoke", first)
    routes.add_post("/v1/admin/members/{node_id}/{action:promote|remove}", second)
    routes.add_get("/v1/admin/backup", first, allow_head=False)
    return routes


def test_an_exact_path_resolves_by_method_and_get_also_answers_head() -> None:
    routes = router()
    assert routes.resolve("GET", "/v1/admin/keys").handler is first
    assert routes.resolve("HEAD", "/v1/admin/keys").handler is first
    assert routes.resolve("POST", "/v1/admin/keys").handler is second
    match = routes.resolve("POST", "/v1/admin/keys")
    assert (match.parameters, match.pattern) == ({}, "/v1/admin/keys")


def test_a_pattern_gives_its_parameters_decoded_and_its_pattern_as_the_label() -> None:
    routes = router()
    match = routes.resolve("POST", "/v1/admin/keys/0123abcd%2F%25/revoke")
    assert match.parameters == {"key_id": "0123abcd/%"}
    assert match.pattern == "/v1/admin/keys/{key_id}/revoke"
    match = routes.resolve("POST", "/v1/admin/members/n2/remove")
    assert match.parameters == {"node_id": "n2", "action": "remove"}


@pytest.mark.parametrize("path", ["/", "/v1/admin/keys/", "/V1/admin/keys", "/v1/admin/keys//revoke",
                                  "/v1/admin/keys/a/b/revoke", "/v1/admin/keys/a/revoke/",
                                  "/v1/admin/members/n2/demote", "/v1/admin/members/n2/promotex",
                                  "/v1/admin/members/n2/xremove"])
def test_a_path_that_fits_no_route_is_not_found(path: str) -> None:
    with pytest.raises(RouteNotFound):
        router().resolve("POST", path)


def test_a_known_path_with_another_method_names_the_allowed_ones() -> None:
    with pytest.raises(MethodNotAllowed) as refused:
        router().resolve("DELETE", "/v1/admin/keys")
    assert refused.value.allowed == ("GET", "HEAD", "POST")
    with pytest.raises(MethodNotAllowed) as refused:
        router().resolve("HEAD", "/v1/admin/backup")
    assert refused.value.allowed == ("GET",)
    with pytest.raises(MethodNotAllowed):
        router().resolve("GET", "/v1/admin/keys/abc/revoke")


def test_a_route_added_twice_or_a_malformed_pattern_is_refused() -> None:
    routes = router()
    with pytest.raises(ValueError):
        routes.add_post("/v1/admin/keys", first)
    with pytest.raises(ValueError):
        routes.add_get("/v1/admin/keys", first)  # its HEAD too
    with pytest.raises(ValueError):
        Router().add_post("/v1/{unclosed", first)
