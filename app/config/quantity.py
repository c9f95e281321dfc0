"""Kubernetes resource quantities ('16Gi', '500m', '1e3') as exact numbers."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip
_QUANTITY = re.compile(
    r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?$"
)


def parse_quantity(text: str | int | float) -> Decimal:
    """Value of a Kubernetes quantity; raises ValueError naming the bad text."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ValueError(
            f"{text!r} is not a Kubernetes quantity (examples: '16Gi', '512Mi', '500m', '2')"
        )
    number, suffix = match.groups()
    try:
        value = Decimal(number) * Decimal(_SUFFIXES[suffix or ""])
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid decimals
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from exc
    if value < 0:
        raise ValueError(f"{text!r} is negative")
    return value
