"""Which load balancer: ``make_balancer`` builds an HAProxy or an NGINX by name.

The seam both implement (``LoadBalancer``, ``Backend``, the errors) is
``keepcount.cluster.balancer``; the implementations import it, and this module
imports them, so nothing imports in a circle.

Example::

    lb = make_balancer("nginx", "/tmp/lb", 8100, [Backend("node-1.a", "127.0.0.1", 8101)])
    lb.start().wait_ready(timeout=10)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from keepcount.cluster.balancer import KINDS, Backend, BalancerConfigError, Listen, LoadBalancer
from keepcount.cluster.haproxy import HAProxy
from keepcount.cluster.nginx import Nginx

__all__ = ["KINDS", "make_balancer"]


def make_balancer(
    kind: str,
    directory: str | os.PathLike[str],
    listen: Listen,
    backends: Sequence[Backend],
    **opts: Any,
) -> LoadBalancer:
    """An unstarted ``HAProxy`` or ``Nginx`` (``kind`` ``"haproxy"`` / ``"nginx"``);
    ``opts`` go to its settings dataclass (unknown names raise ``TypeError``)."""
    if kind == "haproxy":
        return HAProxy(directory, listen, backends, **opts)
    if kind == "nginx":
        return Nginx(directory, listen, backends, **opts)
    raise BalancerConfigError(f"unknown load balancer {kind!r}: expected one of {', '.join(KINDS)}")
