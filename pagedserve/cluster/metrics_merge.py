"""Prometheus families from several sources merged into one valid exposition (no Ray, no I/O).

The ingress's `/metrics` joins its own registry with the `ray_pagedserve_*` families of every
node's Ray export. A family may come from several nodes (each node exports the processes it
hosts) and the same node may be listed twice; the text format wants each family once, with one
HELP and TYPE line, and each series once.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# The families of Ray's export that pagedserve declares (`metric_list.Metric.exported`).
EXPORT_PREFIX = "ray_pagedserve_"


def parse_export(text: str, prefix: str = EXPORT_PREFIX) -> list[Metric]:
    """The families named `prefix*` in a node's export. Other lines are dropped before
    parsing: a node exports hundreds of Ray's own series that `/metrics` does not serve."""
    kept = [line for line in text.splitlines()
            if line.startswith(prefix) or line.startswith((f"# HELP {prefix}", f"# TYPE {prefix}"))]
    return list(text_string_to_metric_families("\n".join(kept) + "\n"))


def merge_families(*sources: Iterable[Metric]) -> list[Metric]:
    """One family per name, sorted by name, each series (name and labels) once: the first
    source that has it wins, so list the freshest first. A family of another type under a
    name already taken is dropped (the text format cannot hold both)."""
    merged: dict[str, Metric] = {}
    seen: set[tuple] = set()
    for source in sources:
        for family in source:
            into = merged.setdefault(family.name, _empty_like(family))
            if into.type != family.type:
                continue
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in seen:
                    seen.add(key)
                    into.samples.append(sample)
    return [merged[name] for name in sorted(merged)]


def render(families: Iterable[Metric], notes: Iterable[str] = ()) -> bytes:
    """Prometheus text (format 0.0.4) of `families`, after `notes` as comment lines."""
    comments = "".join(f"# {note}\n" for note in notes).encode()
    return comments + generate_latest(_Families(list(families)))


def _empty_like(family: Metric) -> Metric:
    return Metric(family.name, family.documentation, family.type, family.unit)


class _Families:
    """What `generate_latest` reads: an object whose `collect()` yields families."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families
