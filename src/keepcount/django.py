"""Django: the ``route`` label for ``keepcount.wsgi.KeepcountWSGIMiddleware``.

Django matches a request to its URL pattern inside its own handler, where a
WSGI middleware around it cannot look.  ``RouteMiddleware``, a Django
middleware, stores the matched pattern in the request's WSGI environ, and
``route_for`` reads it back for the WSGI middleware::

    # settings.py
    MIDDLEWARE = [..., "keepcount.django.RouteMiddleware"]

    # wsgi.py
    application = KeepcountWSGIMiddleware(get_wsgi_application(), registry,
                                          route_for=route_for)

The label is the pattern as declared, includes joined, with a leading slash
(``path("items/<int:item_id>", ...)`` gives ``/items/<int:item_id>``; a
``re_path`` gives its regex without the leading ``^``).  A request no
pattern matched (the resolver's 404) gets ``<unmatched>``; one whose view
raised ``Http404`` keeps its pattern.  The raw path is never used.  Nothing
here imports Django.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ROUTE_KEY", "RouteMiddleware", "route_for"]

ROUTE_KEY = "keepcount.route"
"""The WSGI environ key ``RouteMiddleware`` stores the route template under."""


class RouteMiddleware:
    """A Django middleware: stores ``request.resolver_match.route`` (with a
    leading ``/``) in ``request.environ[ROUTE_KEY]`` once the URL resolved."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        return self.get_response(request)

    def process_view(
        self, request: Any, view_func: object, view_args: object, view_kwargs: object
    ) -> None:
        match = getattr(request, "resolver_match", None)
        route = getattr(match, "route", None)
        environ = getattr(request, "environ", None)
        if isinstance(route, str) and isinstance(environ, dict):
            environ[ROUTE_KEY] = "/" + route.removeprefix("^").removeprefix("/")


def route_for(environ: Mapping[str, Any]) -> str | None:
    """The route ``RouteMiddleware`` stored, or None (``<unmatched>``)."""
    route = environ.get(ROUTE_KEY)
    return route if isinstance(route, str) else None
