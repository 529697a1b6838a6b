"""A minimal single-file Django app (fixture): settings configured here, a
urlpatterns list, and the WSGI application, as `django-admin startproject`
would split over several files."""

import os
import time

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="fdbroker-runner-test-only",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    DATABASES={},
    USE_TZ=True,
)

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402


def root(request):
    return JsonResponse({"hello": "world", "pid": os.getpid(),
                         "framework": "django"})


def sleep(request):
    """Appends "sleeping <pid>" to $RUNNER_TEST_EVENTS (if set), then
    answers after `ms` milliseconds, holding a pool thread."""
    ms = min(max(int(request.GET.get("ms", "0")), 0), 60000)
    events = os.environ.get("RUNNER_TEST_EVENTS")
    if events:
        with open(events, "a") as out:
            out.write(f"sleeping {os.getpid()}\n")
    time.sleep(ms / 1000)
    return JsonResponse({"pid": os.getpid(), "slept_ms": ms})


urlpatterns = [path("", root), path("sleep", sleep)]

application = get_wsgi_application()
