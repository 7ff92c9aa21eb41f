"""Path parameters shared by the /v1 and /v2 routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

from app.schemas import VERSION_SPEC_PATTERN
from wastenet.schema import MODEL_NAME_RE, VERSION_RULE

# The name and version rules are documented as patterns, not enforced by FastAPI:
# the registry answers a name or version that breaks them with its own precise code
# (unknown_model, invalid_version; 400 on /v2) rather than a generic validation error.
ModelName = Annotated[
    str,
    Path(
        description="Model name, e.g. waste-resnet18-cbam.",
        json_schema_extra={"pattern": MODEL_NAME_RE.pattern},
    ),
]
VersionSpec = Annotated[
    str,
    Path(
        description=f"A version number ({VERSION_RULE}), 'latest' (highest ready version) "
        "or an alias.",
        json_schema_extra={"pattern": VERSION_SPEC_PATTERN},
    ),
]
