"""What a search may remove and when it stops: the rules (candidates less protections) and the target,
with the parameter counts that decide a `params_ratio` target. Needs no weights (a model on the meta device
will do), so preflight asks it whether a target is reachable and the flow how much work a search is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from tasks.errors import UserError
from tasks.search.registry import expected_candidates
from tasks.surgery import block_param_counts, candidate_blocks, layer_ids, total_params, units_of


class SearchError(UserError):
    """A search that cannot run as specified (target out of reach, bad protected block...)."""


@dataclass(frozen=True)
class Target:
    blocks: int | None = None
    params_ratio: float | None = None


def edge_layers(ids: list[int], first: int, last: int) -> list[str]:
    """The first `first` and last `last` layers of a model with layers `ids` (Shortened LLaMA's "+")."""
    if first < 0 or last < 0:
        raise SearchError(f"protect_first and protect_last count layers, so they cannot be negative ({first}, {last})")
    kept = set(ids[:first]) | set(ids[max(0, len(ids) - last):] if last else [])
    return [f"layers.{lid}" for lid in ids if lid in kept]


@dataclass(frozen=True)
class SearchRules:
    """Which blocks may go: the candidates of a model at a granularity, less the protected units."""

    layer_ids: tuple[int, ...]
    granularity: str
    protected: frozenset[str]  # units (`layers.N.attn` / `layers.N.mlp`) never removed

    @classmethod
    def of(cls, layer_ids: list[int] | tuple[int, ...] | range, granularity: str, protect: tuple[str, ...] = (),
           protect_first: int = 0, protect_last: int = 0) -> "SearchRules":
        ids = tuple(layer_ids)
        protected = units_of([*protect, *edge_layers(list(ids), protect_first, protect_last)])
        return cls(ids, granularity, frozenset(protected))

    def candidates(self, removed: list[str]) -> list[str]:
        """The blocks that may go next, once `removed` are gone, in model order."""
        gone = units_of(removed)
        return [c for c in candidate_blocks(list(self.layer_ids), self.granularity, gone)
                if not (units_of([c]) & self.protected)]

    def planned_candidates(self, strategy: str, target: Target, settings: Any = None) -> int | None:
        """How many candidates `strategy` scores to reach `target` (None when a parameter ratio decides
        the number of steps): the progress total the terminal and the Prefect UI show."""
        return expected_candidates(strategy, len(self.candidates([])), target.blocks, settings)


@dataclass(frozen=True)
class SearchGoal:
    """The rules and target of a search on one model, with the parameters each unit holds."""

    rules: SearchRules
    target: Target
    unit_params: Mapping[str, int]
    dense_params: int

    @classmethod
    def of(cls, model: nn.Module, rules: SearchRules, target: Target) -> "SearchGoal":
        """The goal on `model`, refused when the target cannot be met under the rules."""
        goal = cls(rules, target, block_param_counts(model), total_params(model))
        goal.check_reachable()
        return goal

    @property
    def granularity(self) -> str:
        return self.rules.granularity

    def candidates(self, removed: list[str]) -> list[str]:
        return self.rules.candidates(removed)

    def params_of(self, blocks: list[str]) -> int:
        return sum(self.unit_params[u] for u in units_of(blocks))

    def most_blocks(self, candidates: list[str]) -> int:
        """The most of `candidates` that a plan taking them in any order needs to meet the target: for
        params_ratio, as many as the smallest ones take (all of them when they cannot)."""
        if self.target.blocks is not None:
            return min(self.target.blocks, len(candidates))
        smallest = sorted(candidates, key=lambda c: self.params_of([c]))
        return next((n for n in range(1, len(smallest) + 1) if self.target_met(smallest[:n])), len(smallest))

    def params_remaining(self, removed: list[str]) -> int:
        return self.dense_params - self.params_of(removed)

    def target_met(self, removed: list[str]) -> bool:
        if self.target.blocks is not None:
            return len(removed) >= self.target.blocks
        return self.params_of(removed) / self.dense_params >= float(self.target.params_ratio)

    def check_reachable(self) -> None:
        every = self.candidates([])
        target, granularity = self.target, self.granularity
        if target.blocks is not None and target.blocks > len(every):
            raise SearchError(
                f"search.target.blocks={target.blocks} cannot be met: this model has {len(every)} "
                f"candidate blocks at granularity '{granularity}' (after protections); use at most {len(every)}"
            )
        if target.params_ratio is not None:
            most = self.params_of(every) / self.dense_params
            if target.params_ratio > most:
                raise SearchError(
                    f"search.target.params_ratio={target.params_ratio} cannot be met: removing every "
                    f"candidate at granularity '{granularity}' removes only {most:.3f} of the parameters"
                )


def check_reachable(model: nn.Module, rules: SearchRules, target: Target) -> None:
    """Refuse a target this model cannot meet; works on a model on the meta device (no weights needed)."""
    SearchGoal.of(model, rules, target)


def rules_for(model: nn.Module, granularity: str, protect: tuple[str, ...] = (), protect_first: int = 0,
              protect_last: int = 0) -> SearchRules:
    """The rules on `model`'s own layers."""
    return SearchRules.of(layer_ids(model), granularity, protect, protect_first, protect_last)
