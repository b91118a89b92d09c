"""`search.mode: auto`: the scoring mode that pays for a run's size, chosen once the windows are known.

Racing pays only when candidates can leave early enough to save work: its first look comes after
`racing.min_windows` windows, and every candidate runs those, so with fewer than twice as many windows a
leaver saves at most half of exact mode's work and often less than bounded mode's vocabulary bounds
save (benchmarks/results/search_scaling.md: at 4 windows racing cannot look at all and is bounded mode's
0.75x; at 16 it is 1.15x faster; at 32, 1.9x). Below that, bounded mode (the same blocks as exact mode by
construction) where the strategy and objective allow it, else exact mode. Every mode it picks chooses exact
mode's blocks: bounded by construction, racing with probability `racing.confidence`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.score.racing import RacingOptions
from tasks.search.fit import combination_problems
from tasks.search.settings import ScoreSection, SearchSection


@dataclass(frozen=True)
class ModeChoice:
    """The mode a search scores in, and why (the spec's own word, or auto's reason)."""

    mode: str  # exact | bounded | racing
    reason: str
    racing: RacingOptions | None = None

    @property
    def exact(self) -> bool:
        return self.mode == "exact"


def choose_mode(score: ScoreSection, search: SearchSection, windows: int) -> ModeChoice:
    """The mode of a search over `windows` calibration windows: the spec's, or auto's choice."""
    given = search.scoring_mode()
    options = search.racing_options()
    if given != "auto":
        source = "search.mode" if search.mode is not None else "search.exact_scores"
        return ModeChoice(given, f"{source} says {given}", options)
    fits = {mode: not combination_problems(score.metric, score.granularity, search.strategy, mode)
            for mode in ("bounded", "racing")}
    fits["bounded"] = fits["bounded"] and search.objective in (None, "ppl")
    enough = 2 * options.min_windows
    if fits["racing"] and windows >= enough:
        return ModeChoice("racing", f"auto: {windows} windows, at least twice racing.min_windows "
                                    f"({options.min_windows}), so candidates behind can leave early", options)
    short = (f"{windows} windows, fewer than twice racing.min_windows ({enough})" if fits["racing"]
             else f"racing does not fit strategy '{search.strategy}' with metric '{score.metric}'")
    if fits["bounded"]:
        return ModeChoice("bounded", f"auto: {short}; bounded mode stops hopeless candidates on lower bounds")
    return ModeChoice("exact", f"auto: {short}, and bounded mode does not fit strategy '{search.strategy}' "
                               f"with metric '{score.metric}' and objective '{search.objective or 'ppl'}'")
