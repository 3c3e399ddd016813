"""Bad data: a fatal `DataError`, and a `SkipReport` that counts skipped records.

A bad record never crashes a run and is never dropped silently: it is skipped,
counted under its reason, and the first few places (file:line or source index)
are kept so the stage can log them with its metrics. A source with no usable
record at all is fatal and raises before training starts.
"""

from __future__ import annotations

import dataclasses

from llm_jax.errors import DataError  # noqa: F401 - the data layer's fatal error

FIRST_PLACES = 5  # places kept per reason: enough to find the pattern, small enough for a log line


@dataclasses.dataclass
class SkipReport:
    """reason -> count, and the first few places of each reason."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    places: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, place: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        first = self.places.setdefault(reason, [])
        if len(first) < FIRST_PLACES:
            first.append(place)

    def merged(self, other: "SkipReport") -> "SkipReport":
        """Both reports' counts added up, and the first places of each reason (this report's first)."""
        out = SkipReport.from_dict(self.to_dict())
        for reason, n in other.counts.items():
            out.counts[reason] = out.counts.get(reason, 0) + n
            first = out.places.setdefault(reason, [])
            first.extend(other.places.get(reason, [])[:FIRST_PLACES - len(first)])
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "places": {k: list(v) for k, v in self.places.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "SkipReport":
        return cls(dict(d.get("counts", {})), {k: list(v) for k, v in d.get("places", {}).items()})

    def summary(self) -> str:
        return "; ".join(f"{n} x {reason} (first at {', '.join(self.places.get(reason, []))})"
                         for reason, n in sorted(self.counts.items())) or "nothing skipped"
