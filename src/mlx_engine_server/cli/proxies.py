"""Which proxies may name the client: uvicorn believes `X-Forwarded-For` (the client address that
rate limits count and the access log shows) and `X-Forwarded-Proto` only from these addresses.

uvicorn's own default trusts 127.0.0.1, so any local program could name itself any address and
get a fresh rate-limit count; here nobody is trusted unless the operator says so with
`--forwarded-allow-ips`, or with uvicorn's `FORWARDED_ALLOW_IPS` for deployments that set it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Annotated

from pydantic import AfterValidator

TRUST_EVERYONE = "*"
UVICORN_ENV = "FORWARDED_ALLOW_IPS"


def check_trusted_proxies(value: str | None) -> str | None:
    """`*`, or comma-separated IP addresses and networks (`10.0.0.0/8`); `""` trusts nobody.
    uvicorn would take a mistyped address as a name that never matches, silently."""
    if value is None:
        return None
    items = [item.strip() for item in value.split(",") if item.strip()]
    if items == [TRUST_EVERYONE]:
        return TRUST_EVERYONE
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(
                f"{item[:64]!r} is not an IP address or network (or * for every address)"
            ) from None
    return ",".join(items)


TrustedProxies = Annotated[str | None, AfterValidator(check_trusted_proxies)]


def trusted_proxies(setting: str | None, environ: Mapping[str, str]) -> str:
    """The setting; without it uvicorn's FORWARDED_ALLOW_IPS (read as uvicorn reads it), when
    set; else nobody ("")."""
    if setting is not None:
        return setting
    return environ.get(UVICORN_ENV, "")
