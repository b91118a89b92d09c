"""Zero-shot downstream tasks through lm-evaluation-harness (`evaluate.tasks`), an optional extra.

pruneflow hands lm-eval its own model object (removed halves, adapters and all), so the numbers are of
exactly the model the other evaluations measure. Task data comes from wherever the task says (the
hub for the standard ones); `evaluate.task_paths` adds folders of task YAMLs, e.g. local files.
"""

from __future__ import annotations

import difflib
import functools
import logging
from typing import Callable, Sequence

from torch import nn

from tasks.evaluation import Evaluation
from tasks.export import load_tokenizer
from tasks.errors import UserError


class DownstreamError(UserError):
    pass


# lm-eval reports these per task; the first found is the headline metric of a multiple-choice task.
_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "word_perplexity")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise DownstreamError(
            "evaluate.tasks needs lm-evaluation-harness: pip install 'pruneflow[eval]' (or pip install lm-eval)"
        ) from err
    return lm_eval, TaskManager


def task_manager(tasks: Sequence[str], task_paths: Sequence[str]):
    """lm-eval's task index; only the given folders when they hold every task (indexing lm-eval's own
    thousands of task files takes many seconds, so one index serves preflight and every stage's evaluation)."""
    return _task_manager(tuple(tasks), tuple(task_paths))


@functools.lru_cache(maxsize=4)
def _task_manager(tasks: tuple[str, ...], task_paths: tuple[str, ...]):
    _, manager_cls = _lm_eval()
    if task_paths:
        local = manager_cls(include_path=list(task_paths), include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return manager_cls(include_path=list(task_paths) or None)


def check_tasks(tasks: Sequence[str], task_paths: Sequence[str]) -> None:
    """Raise with a did-you-mean for task names lm-eval does not know (no data is loaded)."""
    _check_known(tasks, set(task_manager(tasks, task_paths).all_tasks))


def _check_known(tasks: Sequence[str], known: set[str]) -> None:
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise DownstreamError(
                f"evaluate.tasks: lm-eval has no task '{name}'{hint} (add folders of task YAMLs with evaluate.task_paths)"
            )


def downstream_evaluations(model: nn.Module, tokenizer_path: str, stage: str, tasks: Sequence[str],
                           task_paths: Sequence[str], limit: int | None, batch_size: int,
                           trust_remote_code: bool = False,
                           on_requests: Callable[[str, int, int], None] | None = None) -> list[Evaluation]:
    """`on_requests(task, done, total)` follows each task's requests to the model (progress bars)."""
    lm_eval, _ = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, task_paths)
    _check_known(tasks, set(manager.all_tasks))
    lm = HFLM(pretrained=model, tokenizer=load_tokenizer(tokenizer_path, trust_remote_code), batch_size=batch_size)
    out = []
    for name in tasks:
        if on_requests is not None:
            _follow_requests(lm, lambda done, total, name=name: on_requests(name, done, total))
        results = _run_task(lm_eval, lm, manager, name, limit)
        out.extend(_rows(stage, name, results))
    return out


# Requests handed to lm-eval's model at a time, so that progress can follow them (lm-eval shows its own bar
# on the terminal only). Each request's result does not depend on the others in its call.
_SLICE = 64


def _follow_requests(lm, report: Callable[[int, int], None]) -> None:
    """Every request type of this model object (an instance of pruneflow's own) goes through in slices."""
    for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(type(lm), kind).__get__(lm)

        def sliced(requests, disable_tqdm: bool = False, method=method):
            out = []
            for start in range(0, len(requests), _SLICE):
                out += method(requests[start:start + _SLICE], disable_tqdm=disable_tqdm)
                report(min(start + _SLICE, len(requests)), len(requests))
            return out

        setattr(lm, kind, sliced)


def _run_task(lm_eval, lm, manager, name: str, limit: int | None) -> dict:
    lm_eval_logger = logging.getLogger("lm_eval")
    level = lm_eval_logger.level
    lm_eval_logger.setLevel(logging.ERROR)
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=limit,
                                       log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    except (ConnectionError, OSError, FileNotFoundError) as err:
        raise DownstreamError(
            f"evaluate.tasks: the data of lm-eval task '{name}' could not be reached ({type(err).__name__}: {err}); "
            "run where the hub is reachable, pre-download it into the datasets cache, or point a local task "
            "YAML at files (evaluate.task_paths)"
        ) from err
    finally:
        lm_eval_logger.setLevel(level)


def _rows(stage: str, task: str, results: dict) -> list[Evaluation]:
    metrics = results["results"].get(task)
    if metrics is None:
        raise DownstreamError(f"lm-eval returned no results for task '{task}' (a group? list its tasks instead)")
    samples = results.get("n-samples", {}).get(task, {}).get("effective")
    rows = []
    for key, value in sorted(metrics.items()):
        metric, _, _filter = key.partition(",")
        if metric in _METRICS and isinstance(value, (int, float)):
            rows.append(Evaluation(stage, "task", task, metric, float(value), n_samples=samples))
    if not rows:
        raise DownstreamError(f"lm-eval task '{task}' reported none of the metrics {list(_METRICS)}: {sorted(metrics)}")
    return rows
