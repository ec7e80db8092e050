"""Which tasks should share a network: TAG's network selection from measured affinities (`mtl affinity`).

Fifty, Amid, Zhao, Yu, Anil and Finn, "Efficiently Identifying Task Groupings in Multi-Task Learning", NeurIPS 2021.

The science: a network trained on a group G of tasks serves each task j in G with the affinity onto j from the other
members, the mean of Z(i -> j) over i in G, i != j (a task alone in its network gets 0: no transfer). Given a budget
of K networks, the paper picks the groups that maximise, summed over the tasks, the affinity onto each task from the
group that serves it best; groups may overlap (a task may be trained in several networks and is served by its best
one, the others only borrow it). Both readings are here:

- `disjoint=False` (the paper's): covers of the tasks by at most K groups. Exhaustive and exact: each task is served
  by one group, so a cover is a partition of the tasks into the sets each group serves (at most K blocks) plus, per
  block, the helpers its group adds; the best group for a served set S is searched over all supersets of S (3^T pairs
  in all), then every partition into K blocks is scored. Two blocks may pick the same best group, so the best cover
  can use fewer than K networks: more would add nothing.
- `disjoint=True`: partitions of the tasks into exactly K groups, each task in one network.

The paper searches with branch and bound for large T; for the few tasks of multi-task vision (T <= 10 here) the
exhaustive search is instant. Ties (equal scores to 1e-12) go to fewer task slots in all (less to train), then to the
groups that list the earlier tasks first. Entries never measured (tasks that never met in a batch) count as 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

MAX_TASKS = 10  # 3^10 (superset pairs) and Bell(10) = 115975 partitions: a second or so


@dataclass(frozen=True)
class Grouping:
    """Groups of task indices; `serves[k]`: the tasks group k serves (those it is the best group for); `onto[j]`:
    the affinity onto task j from the group serving it; `score`: their sum."""

    groups: tuple[tuple[int, ...], ...]
    serves: tuple[tuple[int, ...], ...]
    onto: tuple[float, ...]
    score: float

    def group_score(self, k: int) -> float:
        return sum(self.onto[j] for j in self.serves[k])


def onto(affinity: Sequence[Sequence[float]], group: Sequence[int], task: int) -> float:
    """The affinity onto `task` from the other members of `group` (their mean; 0 when it is alone)."""
    others = [affinity[i][task] for i in group if i != task]
    return sum(others) / len(others) if others else 0.0


def propose(affinity: Sequence[Sequence[float]], k: int, disjoint: bool = False, top: int = 5) -> list[Grouping]:
    """The `top` best groupings of the tasks into `k` groups, best first. `affinity[i][j]` = Z(i -> j); None or NaN
    entries count as 0."""
    n = len(affinity)
    if not 1 <= k <= n:
        raise ValueError(f"groups={k} must be between 1 and the number of tasks, {n}")
    if n > MAX_TASKS:
        raise ValueError(f"{n} tasks: the exhaustive search covers at most {MAX_TASKS}")
    z = [[0.0 if v is None or not math.isfinite(v) else float(v) for v in row] for row in affinity]
    best_group = {served: served if disjoint else best_superset(z, served, n) for served in subsets(n)}
    found: dict[tuple, Grouping] = {}
    for blocks in partitions(list(range(n)), k):
        groups = tuple(sorted({best_group[tuple(block)] for block in blocks}))
        if groups not in found:
            found[groups] = served_by_best(z, groups)
    return sorted(found.values(), key=order)[:top]


def order(g: Grouping) -> tuple:
    return -round(g.score, 12), sum(map(len, g.groups)), g.groups


def served_by_best(z: list[list[float]], groups: tuple[tuple[int, ...], ...]) -> Grouping:
    """The cover's score: each task served by its best group among those holding it (the first one on a tie)."""
    n = len(z)
    serving = [max((g for g in groups if j in g), key=lambda g: onto(z, g, j)) for j in range(n)]
    values = tuple(onto(z, serving[j], j) for j in range(n))
    serves = tuple(tuple(j for j in range(n) if serving[j] == g) for g in groups)
    return Grouping(groups, serves, values, sum(values))


def served_value(z: list[list[float]], group: tuple[int, ...], served: tuple[int, ...]) -> float:
    return sum(onto(z, group, j) for j in served)


def best_superset(z: list[list[float]], served: tuple[int, ...], n: int) -> tuple[int, ...]:
    """The group holding `served` that gives them the most affinity; ties go to the smaller, then earlier, group."""
    rest = [i for i in range(n) if i not in served]
    best, value = served, served_value(z, served, served)
    for size in range(1, len(rest) + 1):
        for helpers in itertools.combinations(rest, size):
            group = tuple(sorted(served + helpers))
            candidate = served_value(z, group, served)
            if round(candidate, 12) > round(value, 12):
                best, value = group, candidate
    return best


def subsets(n: int) -> Iterator[tuple[int, ...]]:
    for size in range(1, n + 1):
        yield from itertools.combinations(range(n), size)


def partitions(items: list[int], k: int) -> Iterator[list[list[int]]]:
    """Every partition of `items` into exactly `k` non-empty blocks (each once: a new block opens in order)."""
    if not items:
        if k == 0:
            yield []
        return
    first, rest = items[0], items[1:]
    for blocks in partitions(rest, k - 1):  # `first` alone
        yield [[first], *blocks]
    if k <= len(rest):
        for blocks in partitions(rest, k):  # `first` joins one of the blocks
            for i in range(len(blocks)):
                yield [*blocks[:i], [first, *blocks[i]], *blocks[i + 1:]]
