from django.http import HttpRequest, JsonResponse

from mysite.wsgi import registry

ITEMS = {1: "apple", 2: "pear"}


def read_item(request: HttpRequest, item_id: int) -> JsonResponse:
    if item_id not in ITEMS:
        return JsonResponse({"detail": "no such item"}, status=404)
    return JsonResponse({"id": item_id, "name": ITEMS[item_id]})


def counts(request: HttpRequest) -> JsonResponse:
    totals = registry.host_totals("http_requests_total")  # every worker's, durable
    return JsonResponse(
        {
            "node": registry.host,
            "worker": registry.node,  # the slot of the worker that answered
            "http_requests_total": [{**t.labels, "value": t.value} for t in totals],
        }
    )
