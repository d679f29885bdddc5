"""The example Django project's WSGI app, counted by keepcount in every worker.

Run it from the repository root::

    .venv/bin/gunicorn -w 4 --chdir examples/django_app mysite.wsgi
    curl localhost:8000/items/1
    curl localhost:8000/metrics         # the host's totals, whichever worker answers
    curl localhost:8000/counts          # the same, as JSON

Configured only by ``KEEPCOUNT_STORE`` and ``KEEPCOUNT_NODE`` (read in
``settings.py``), the same for every worker: each worker takes a slot of
that host and restores it before it serves.
"""

import os
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core.wsgi import get_wsgi_application

import keepcount
from keepcount.django import route_for
from keepcount.wsgi import KeepcountWSGIMiddleware, make_wsgi_app

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
django_app = get_wsgi_application()

# Opened at import, in each worker: takes a slot of the host and restores it.
# Flushed and given back when the worker exits (--max-requests, SIGTERM).
registry = keepcount.open(settings.KEEPCOUNT_STORE, node=settings.KEEPCOUNT_NODE)

# Each response starts only once its count is durable (durable=True); the
# route label comes from keepcount.django.RouteMiddleware (in MIDDLEWARE).
counted = KeepcountWSGIMiddleware(django_app, registry, route_for=route_for)
metrics = make_wsgi_app(registry)


def application(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """/metrics for the host (not counted); everything else counted."""
    if environ.get("PATH_INFO") == "/metrics":
        return metrics(environ, start_response)
    return counted(environ, start_response)
