"""The store's own records and the pure rules that every implementation shares, without SQL.

The Protocols (:mod:`batchd.store.protocols`), the SQL implementations and the in-memory one
(:mod:`batchd.store.memory`) all take their types from here, so that the contract and the
memory store load neither SQLAlchemy nor the schema (``tests/unit/test_store_types.py``):

- :data:`UNFINISHED`: the statuses of a batch that has not ended
- :class:`KeyState` and :func:`held_key`: what a claim of an ``Idempotency-Key`` finds
  (:mod:`batchd.store.keyed`)
- :class:`MessageBatchRow`: one of Anthropic's message batches
  (:mod:`batchd.store.message_batches`)
- :class:`SlotDemand`, :class:`SlotGrant`, :func:`fair_shares`, :func:`grant`,
  :func:`grants_for`, :func:`slot_leases`: the shares of a deployment's in-flight slots
  (:mod:`batchd.store.slots`)
- :class:`QueueState`, :class:`SlotUse`: the queue as ``/metrics`` reads it
  (:mod:`batchd.store.state`)
- :class:`TokenUsage`: tokens per project and deployment (:mod:`batchd.store.usage`)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from batchd.models import CANCELLING, FINALIZING, IN_PROGRESS, VALIDATING

UNFINISHED = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)

# -- idempotency keys ------------------------------------------------------------------------

Claim = Literal["new", "replay", "conflict", "in_flight"]


@dataclass(frozen=True, slots=True)
class KeyState:
    """What :meth:`IdempotencyKeyStore.claim <batchd.store.protocols.IdempotencyKeyStore>`
    found: ``new`` (the caller now holds the key and must ``finish`` or ``release`` it),
    ``replay`` (the same request made ``result_id``), ``conflict`` (another request used the
    key) or ``in_flight`` (the same request is still running elsewhere)."""

    claim: Claim
    result_id: str | None = None


def held_key(
    held_fp: str,
    result_id: str | None,
    created_at: int,
    fingerprint: str,
    now: int,
    *,
    ttl: int,
    stale: int,
) -> KeyState | None:
    """What a claim at ``now`` finds of a key recorded at ``created_at`` for ``held_fp``
    (having made ``result_id``, if not None); None: it lapsed (``ttl``) or its request went
    stale (``stale``), and the claim takes it over."""
    if created_at <= now - ttl or (result_id is None and created_at <= now - stale):
        return None
    if held_fp != fingerprint:
        return KeyState("conflict")
    if result_id is None:
        return KeyState("in_flight")
    return KeyState("replay", result_id)


# -- message batches -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageBatchRow:
    """A message batch: ``counts`` is ``{succeeded, errored, canceled, expired}`` once kept."""

    id: str
    project: str
    batch_id: str
    created_at: int
    deleted_at: int | None = None
    counts: dict[str, int] | None = None


# -- deployment slots ------------------------------------------------------------------------


def even(_project: str) -> float:
    """Every project's weight when none is configured."""
    return 1.0


@dataclass(frozen=True, slots=True)
class SlotDemand:
    """What one process asks of a deployment: ``limit`` is the deployment's
    ``max_concurrency``, ``want`` what it could use now, ``in_flight`` what it uses."""

    limit: int
    want: int
    in_flight: int
    projects: Mapping[str, int] = field(default_factory=dict)  # want by project

    def by_project(self) -> dict[str, int]:
        """The want split by project (one unnamed project when none is given)."""
        wants = {p: min(w, self.limit) for p, w in self.projects.items() if w > 0}
        return wants or ({"": min(self.want, self.limit)} if self.want > 0 else {})


@dataclass(frozen=True, slots=True)
class SlotGrant:
    slots: int  # what the process holds (its fair share, or more while its excess drains)
    target: int  # its fair share; ``slots < target`` until others hand back what they hold

    @property
    def capacity(self) -> int:
        """What the process may have in flight: never above its fair share, so that what it
        holds beyond it drains and is handed back at the next renewal."""
        return min(self.slots, self.target)

    @property
    def settled(self) -> bool:
        return self.slots == self.target


@dataclass(frozen=True, slots=True)
class SlotLease:
    """The lease row a process keeps for one deployment until its next renewal: ``want``
    capped at the limit, the ``slots`` granted, the want by project."""

    deployment: str
    want: int
    slots: int
    projects: dict[str, int]


def fair_shares(
    limit: int, wants: dict[str, int], weight: Callable[[str], float] = even
) -> dict[str, int]:
    """Weighted max-min fair division of ``limit`` slots: a key gets at most its want, and
    the rest is shared in proportion to the weights (water-filling); the slots left by rounding
    go one by one to the key at the lowest weighted level. Sums to ``min(limit, sum(wants))``."""
    shares = dict.fromkeys(wants, 0)
    active = {k for k, w in wants.items() if w > 0}
    left = limit
    while active and left > 0:
        total = sum(weight(k) for k in active)
        level = {k: left * weight(k) / total for k in active}
        full = {k for k in active if wants[k] - shares[k] <= level[k]}
        if not full:
            for k in active:
                shares[k] += int(level[k])
            for _ in range(limit - sum(shares.values())):  # fewer than len(active)
                k = min(active, key=lambda k: (shares[k] / weight(k), k))
                shares[k] += 1
            break
        for k in full:
            left -= wants[k] - shares[k]
            shares[k] = wants[k]
        active -= full
    return shares


def grant(
    me: str,
    demand: SlotDemand,
    others: dict[str, tuple[int, int, dict[str, int]]],
    weight: Callable[[str], float] = even,
) -> SlotGrant:
    """``others``: owner -> (want, slots, want by project) of the other live leases of the
    deployment. The fair share is computed between projects, then within each project
    between the processes that want slots for it."""
    by_owner = {o: projects for o, (_, _, projects) in others.items()}
    by_owner[me] = demand.by_project()
    project_wants: dict[str, int] = {}
    for projects in by_owner.values():
        for p, w in projects.items():
            project_wants[p] = min(demand.limit, project_wants.get(p, 0) + w)
    target = 0
    for p, share in fair_shares(demand.limit, project_wants, weight).items():
        mine = by_owner[me].get(p, 0)
        if mine:
            wants = {o: projects.get(p, 0) for o, projects in by_owner.items()}
            target += fair_shares(share, wants)[me]
    free = max(0, demand.limit - sum(s for _, s, _ in others.values()))
    # Keep the slots in use (they are ours already, and drain down to the fair share), take
    # free ones up to the fair share.
    return SlotGrant(min(free, max(target, demand.in_flight)), target)


def grants_for(
    owner: str,
    demands: dict[str, SlotDemand],
    held: Iterable[tuple[str, str, int, int, dict[str, int]]],
    weight: Callable[[str], float] = even,
) -> dict[str, SlotGrant]:
    """``owner``'s grant for each deployment it asks for, given the other live leases
    ``held``: ``(deployment, owner, want, slots, want by project)``."""
    others: dict[str, dict[str, tuple[int, int, dict[str, int]]]] = {d: {} for d in demands}
    for deployment, other, want, slots, projects in held:
        if deployment not in others or other == owner:
            continue
        if not projects and want > 0:
            projects = {"": want}
        others[deployment][other] = (want, slots, projects)
    return {d: grant(owner, demands[d], others[d], weight) for d in demands}


def slot_leases(
    demands: dict[str, SlotDemand], grants: dict[str, SlotGrant]
) -> list[SlotLease]:
    """The lease row of each deployment granted (:func:`grants_for`), as every store keeps it."""
    return [
        SlotLease(d, min(demands[d].want, demands[d].limit), g.slots, demands[d].by_project())
        for d, g in grants.items()
    ]


# -- the queue as /metrics reads it ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlotUse:
    """A deployment's slot leases over the live engine processes."""

    processes: int  # engine processes holding a lease
    want: int  # requests they could have in flight now (in flight + waiting, each capped)
    slots: int  # slots they hold


@dataclass(frozen=True, slots=True)
class QueueState:
    batches: dict[str, int] = field(default_factory=dict)  # status -> count
    shards_waiting: int = 0  # pending and not leased (or the lease lapsed)
    shards_leased: int = 0
    requests_left: int = 0  # in batches still running: total - completed - failed
    slots: dict[str, SlotUse] = field(default_factory=dict)  # deployment -> leases
    # deployment -> project -> slots its batches could use now, over the live processes
    project_wants: dict[str, dict[str, int]] = field(default_factory=dict)


# -- token usage -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """One (project, model) row of ``GET /v1/usage`` and ``batchd usage``; tokens."""

    project: str
    model: str  # the deployment's model name; "" for a batch that never got one
    enqueued: int  # token estimates of the batches not ended yet (what the quotas hold)
    input_tokens: int  # reported as used by the upstream, over every batch kept
    output_tokens: int
    unfinished: int  # batches not ended

    def to_wire(self) -> dict[str, object]:
        return {
            "object": "usage",
            "project": self.project,
            "model": self.model,
            "enqueued_tokens": self.enqueued,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "unfinished_batches": self.unfinished,
        }
