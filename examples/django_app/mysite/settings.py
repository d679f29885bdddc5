"""Settings of the example Django project: the two keepcount lines are marked."""

import os

# keepcount: the store and the host's node id, the same for every worker.
KEEPCOUNT_STORE = os.environ.get("KEEPCOUNT_STORE", "sqlite:///example-counters.db")
KEEPCOUNT_NODE = os.environ.get("KEEPCOUNT_NODE", "example-1")

MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "keepcount.django.RouteMiddleware",  # keepcount: the route label
]

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "mysite.wsgi.application"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
