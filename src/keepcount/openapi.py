"""The node's OpenAPI document: moved to ``keepcount.node.openapi`` (derived
from the route table and the body types); this path keeps working."""

from __future__ import annotations

from keepcount.node.bodies import DEFAULT_HELP, MAX_HELP_LENGTH
from keepcount.node.openapi import OPENAPI, operations

__all__ = ["DEFAULT_HELP", "MAX_HELP_LENGTH", "OPENAPI", "operations"]
