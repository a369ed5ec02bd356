"""Size against quality: which of the models a run measured are worth shipping. A model is dominated when
another is no larger (sizes within 0.1% count as equal) and no worse on every text both were scored on, and
better on one of them; only the others (the frontier) are worth a user's choice."""
from __future__ import annotations


def quality(point: dict) -> dict[str, float]:
    """{text: perplexity} of a measured model or candidate."""
    if point.get("evaluations"):
        return {e["dataset"]: e["perplexity"] for e in point["evaluations"] if "perplexity" in e}
    return {k: v for k, v in (point.get("quality") or {}).items() if v is not None}


# Sizes within this share of each other count as equal: two files of one architecture and weight type differ by
# some kilobytes with the values they hold (measured: 0.02-0.05% between two healings of one cut), which no
# user would trade quality for.
SIZE_TOLERANCE = 0.001


def dominates(b: dict, a: dict) -> bool:
    """Whether `b` is no larger (within SIZE_TOLERANCE) and no worse than `a` on every text both have, and better
    somewhere (smaller beyond the tolerance, or better on a text)."""
    qa, qb = quality(a), quality(b)
    shared = set(qa) & set(qb)
    if b.get("disk_mb") is None or a.get("disk_mb") is None or not shared:
        return False
    size_b, size_a = b["disk_mb"], a["disk_mb"]
    if size_b > size_a * (1 + SIZE_TOLERANCE) or any(qb[t] > qa[t] for t in shared):
        return False
    return size_b < size_a * (1 - SIZE_TOLERANCE) or any(qb[t] < qa[t] for t in shared)


def mark(points: list[dict]) -> list[dict]:
    """Set `dominated_by` (the name of the smallest model that dominates it) on each dominated point."""
    for a in points:
        better = [b for b in points if b is not a and dominates(b, a)]
        if better:
            a["dominated_by"] = min(better, key=lambda b: b["disk_mb"])["name"]
        else:
            a.pop("dominated_by", None)
    return points


def describe(point: dict, by: dict) -> str:
    """'X is larger and worse than Y' in numbers."""
    qa, qb = quality(point), quality(by)
    worse = ", ".join(f"{qa[t]:.3f} vs {qb[t]:.3f} on {t}" for t in qa if t in qb)
    return (f"{point['name']} ({point['disk_mb']:.1f} MB) is no smaller and no better than {by['name']} "
            f"({by['disk_mb']:.1f} MB): perplexity {worse}")
