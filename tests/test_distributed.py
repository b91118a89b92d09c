"""Distributed scoring (execution.runner: dask): same blocks and scores as local, across shards and faults.

The flow tests use a real local Dask cluster of 2 worker processes (shared by the module, reached
through execution.address) and a real SIGKILL of one worker process in the middle of a step.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from catalog import Catalog
from flows import prune_pipeline
from flows.cli import main as cli
from flows.keys import identity_hash, stage_key
from tasks.search_stage import SearchSections
from pipelines import IDENTITY_SECTIONS, load_spec
from tasks.windows import save_windows
from tasks.distributed.scorer import DistributedScorer
from tasks.distributed.shards import shard_layout
from tasks.distributed.worker import ShardJob, score_shard
from tasks.residual import predictions
from tasks.score import CandidateScore
from tasks.score.racing import RacingOptions, Racer
from tasks.search import Target, run_search
from tests.searchkit import search_context
from tests.flowkit import tiny_pipeline
from tests.tiny import tiny_model, tiny_windows

pytestmark = pytest.mark.timeout(300)

# Windows enough that a shard's first task lasts long enough to be killed in the middle.
CALIBRATION = {"samples": 8, "seq_len": 48}


def _pipeline(root: Path, execution: dict | None = None) -> Path:
    path = tiny_pipeline(root, calibration=CALIBRATION)
    if execution is not None:
        spec = yaml.safe_load(path.read_text())
        spec["execution"] = execution
        path.write_text(yaml.safe_dump(spec))
    return path


def _outcome(summary: dict) -> tuple[list[str], dict[tuple[int, str], tuple[float, bool, int]], list[float]]:
    catalog = Catalog(Path(summary["catalog"]))
    scores = {(r.step, r.block): (r.value, r.exact, r.n_tokens) for r in catalog.scores(summary["run_id"])}
    steps = catalog.steps(summary["run_id"])
    return [s.block for s in steps], scores, [s.value for s in steps]


def _assert_same(outcome, reference) -> None:
    blocks, scores, values = outcome
    ref_blocks, ref_scores, ref_values = reference
    assert blocks == ref_blocks
    assert scores.keys() == ref_scores.keys()
    for key, (value, exact, tokens) in scores.items():
        ref_value, ref_exact, ref_tokens = ref_scores[key]
        assert (exact, tokens) == (ref_exact, ref_tokens), key
        assert math.isclose(value, ref_value, rel_tol=1e-6), (key, value, ref_value)
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(values, ref_values))


# --- spec ------------------------------------------------------------------------------------------
def test_execution_never_changes_identity_or_cache_keys(tmp_path):
    plain = load_spec(_pipeline(tmp_path))
    dask = plain.model_copy(update={"execution": load_spec(
        _pipeline(tmp_path / "d", {"runner": "dask", "workers": 2, "threads": 2})).execution})
    assert "execution" not in plain.model_dump(mode="json")  # specs that never name it serialize as before
    assert dask.model_dump(mode="json")["execution"]["workers"] == 2
    assert dask.section_json(*IDENTITY_SECTIONS) == plain.section_json(*IDENTITY_SECTIONS)
    assert identity_hash(dask) == identity_hash(plain)
    # The search task is given `execution` beside the sections it keys on; the key leaves it out.
    given = {"sections": SearchSections(plain.model, plain.score, plain.search), "run_id": "r"}
    assert stage_key("search", {**given, "execution": dask.execution}) == stage_key(
        "search", {**given, "execution": plain.execution})
    side_by_side = plain.model_copy(update={"execution": load_spec(
        _pipeline(tmp_path / "p", {"parallel_candidates": 3})).execution})
    assert side_by_side.execution.parallel_candidates == 3
    assert identity_hash(side_by_side) == identity_hash(plain)
    assert stage_key("search", {**given, "execution": side_by_side.execution}) == stage_key(
        "search", {**given, "execution": plain.execution})
    assert stage_key("search", {**given, "run_id": "other"}) != stage_key("search", given)  # the key can change
    explicit_local = load_spec(_pipeline(tmp_path / "l", {"runner": "local"}))
    assert explicit_local.model_dump(mode="json") == load_spec(_pipeline(tmp_path / "l")).model_dump(mode="json")


@pytest.mark.parametrize("execution,message", [
    ({"runner": "dask"}, "exactly one of execution.address"),
    ({"runner": "dask", "workers": 2, "address": "tcp://127.0.0.1:8786"}, "exactly one of execution.address"),
    ({"runner": "local", "workers": 2}, "execution.workers apply only with execution.runner: dask"),
    ({"runner": "dask", "workers": 0}, "execution.workers"),
    ({"runner": "ray", "workers": 2}, "execution.runner"),
    ({"runner": "dask", "workers": 2, "parallel_candidates": 2},
     "execution.parallel_candidates applies only with execution.runner: local"),
    ({"parallel_candidates": 0}, "execution.parallel_candidates must be 'auto' or an integer from 1 to 256"),
    ({"parallel_candidates": "many"}, "execution.parallel_candidates"),
])
def test_bad_execution_exits_2_naming_the_field(tmp_path, capsys, execution, message):
    assert cli(["validate", str(_pipeline(tmp_path, execution))]) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_dask_refuses_metrics_it_cannot_shard(tmp_path, capsys):
    path = _pipeline(tmp_path, {"runner": "dask", "workers": 2})
    assert cli(["validate", str(path), "--set", "score.metric=block_influence", "--set", "score.granularity=layer",
                "--set", "search.strategy=one_shot"]) == 2
    assert "shards the metrics perplexity only, not 'block_influence'" in capsys.readouterr().err


def test_shard_layout_covers_every_batch_once():
    assert [(s.first_batch, s.stop_batch) for s in shard_layout(7, 3)] == [(0, 3), (3, 5), (5, 7)]
    assert len(shard_layout(2, 8)) == 2  # never an empty shard
    with pytest.raises(ValueError, match="at least one batch"):
        shard_layout(0, 2)


# --- shards in this process: the combination and early abort, without a cluster ---------------------
class InProcessShards:
    """Runs the real worker function on each shard in turn, in this process."""

    def __init__(self, template: ShardJob, shards: int, windows: int = 8):
        self.windows = windows
        batches = math.ceil(self.windows / template.batch_windows)
        self.template, self.shards = template, shard_layout(batches, shards)

    def run(self, removed, candidates, bound, batches=()):
        threads = torch.get_num_threads()  # a worker sets its own; this process keeps what it had
        try:
            return [score_shard(replace(self.template, shard=s.index, first_batch=s.first_batch,
                                        stop_batch=s.stop_batch, removed=removed, candidates=candidates, bound=bound,
                                        batches=tuple(b for b in batches if s.first_batch <= b < s.stop_batch)))
                    for s in self.shards
                    if not batches or any(s.first_batch <= b < s.stop_batch for b in batches)]
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("exact", [True, False])
def test_sharded_search_equals_local(tmp_path, exact):
    model, windows = tiny_model("llama", layers=4), tiny_windows(samples=8, seq_len=32)
    model.save_pretrained(tmp_path / "model")
    ref = save_windows(windows, tmp_path / "windows.safetensors", "calibration")
    settings = dict(metric="perplexity", granularity="sublayer", target=Target(blocks=4), batch_windows=2)
    local = search_context(model, windows, exact=True, **settings)
    local_records = run_search(local, "iterative")
    local_scores = local.recorder.scores
    template = ShardJob(str(tmp_path / "model"), ref.path, ref.sha256, "float32", "cpu", 1, 2, math.inf,
                        0, 0, 0, (), ())
    for shards in (1, 2, 3):
        scorer = DistributedScorer(InProcessShards(template, shards), predictions(windows), exact)
        ctx = search_context(model, windows, exact=exact, scorer=scorer, **settings)
        records = run_search(ctx, "iterative")
        assert [r.block for r in records] == [r.block for r in local_records], shards
        assert [r.value for r in records] == [r.value for r in local_records]  # bit for bit
        stopped = 0
        for step, scores in ctx.recorder.scores.items():
            for block, score in scores.items():
                reference = local_scores[step][block].value
                if score.exact:
                    assert score.value == reference, (shards, step, block)
                else:
                    stopped += 1
                    assert score.value <= reference  # a lower bound
        assert scorer.rounds == (4 if exact else 8)  # early abort: the bound's round, then the rest
        if exact:
            assert stopped == 0


@pytest.mark.parametrize("strategy, granularity, objective, target", [
    ("iterative", "sublayer", "ppl", Target(blocks=3)),
    ("iterative", "sublayer", "ppl_per_param", Target(params_ratio=0.25)),
    ("one_shot", "sublayer", "ppl", Target(blocks=1)),
    ("consecutive", "layer", "ppl", Target(blocks=2)),
])
def test_sharded_race_equals_local_race(tmp_path, strategy, granularity, objective, target):
    """The flow races on per-window NLLs from the shards: same choices, same exact scores, and the same
    candidates leave with the same partial values and intervals as in a local race."""
    model, windows = tiny_model("llama", layers=4), tiny_windows(samples=16, seq_len=32)
    model.save_pretrained(tmp_path / "model")
    ref = save_windows(windows, tmp_path / "windows.safetensors", "calibration")
    # A loose confidence, so that candidates of a random model leave on 16 windows.
    racing = RacingOptions(confidence=0.5, min_windows=2, round_windows=2)
    settings = dict(metric="perplexity", granularity=granularity, target=target, batch_windows=2, racing=racing,
                    objective=objective)
    local = search_context(model, windows, exact=False, **settings)
    local_records = [(r.block, r.value) for r in run_search(local, strategy)]
    assert any(not s.exact for scores in local.recorder.scores.values() for s in scores.values())
    template = ShardJob(str(tmp_path / "model"), ref.path, ref.sha256, "float32", "cpu", 1, 2, math.inf,
                        0, 0, 0, (), ())
    racer = Racer(racing, [2] * 8, [2 * 31] * 8)
    for shards in (1, 3):
        scorer = DistributedScorer(InProcessShards(template, shards, 16), predictions(windows), False, racer)
        ctx = search_context(model, windows, exact=False, scorer=scorer, **settings)
        assert [(r.block, r.value) for r in run_search(ctx, strategy)] == local_records, shards
        assert ctx.recorder.scores == _without_seconds(local.recorder.scores, ctx.recorder.scores)
        assert scorer.rounds >= 2  # the race went round by round


def _without_seconds(local: dict, sharded: dict) -> dict:
    """`local` with the seconds that `sharded` measured, so that only the numbers that matter compare."""
    return {step: {block: replace(score, seconds=sharded[step][block].seconds) for block, score in scores.items()}
            for step, scores in local.items()}


def test_a_candidate_past_the_bound_stops_on_every_shard(tmp_path):
    model, windows = tiny_model("llama", layers=4), tiny_windows(samples=8, seq_len=32)
    model.save_pretrained(tmp_path / "model")
    ref = save_windows(windows, tmp_path / "windows.safetensors", "calibration")
    template = ShardJob(str(tmp_path / "model"), ref.path, ref.sha256, "float32", "cpu", 1, 2, math.inf,
                        0, 0, 0, (), ())
    exact = {s.block: s for s in DistributedScorer(InProcessShards(template, 2), predictions(windows), True)
             .score(set(), ["layers.1.attn", "layers.2.mlp", "layers.3.mlp"], {}, lambda s: None).values()}
    # A known exact score of perplexity 1 (NLL total 0) is a bound every other candidate passes at once.
    known = {"layers.1.attn": CandidateScore("layers.1.attn", 1.0, 248, 0.0, True)}
    scorer = DistributedScorer(InProcessShards(template, 2), predictions(windows), False)
    reported = []
    scores = scorer.score(set(), ["layers.1.attn", "layers.2.mlp", "layers.3.mlp"], known, reported.append)
    assert scorer.rounds == 1  # the known score is the bound: no first round
    assert [s.block for s in reported] == ["layers.2.mlp", "layers.3.mlp"]
    for block in ("layers.2.mlp", "layers.3.mlp"):
        # Each of the 2 shards (2 batches of 2 windows) stopped after its first batch.
        assert not scores[block].exact and scores[block].n_tokens == 2 * 2 * 31
        assert 1.0 < scores[block].value < exact[block].value


# --- a real local Dask cluster -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local_cluster:
        with Client(local_cluster) as client:
            # Workers import torch and prefect while the local run goes (held futures, never waited on).
            warming = [client.submit(_import_worker_modules, workers=[w], pure=False)
                       for w in client.scheduler_info()["workers"]]
            yield local_cluster, client
            del warming


def _import_worker_modules() -> None:
    import prefect.task_engine  # noqa: F401
    import tasks.distributed.worker  # noqa: F401
    import tasks.export  # noqa: F401


@pytest.fixture(scope="module")
def local_outcome(tmp_path_factory):
    return _outcome(prune_pipeline(str(_pipeline(tmp_path_factory.mktemp("local")))))


def test_two_dask_workers_choose_and_score_as_local(tmp_path, cluster, local_outcome):
    local_cluster, client = cluster
    summary = prune_pipeline(str(_pipeline(tmp_path, {"runner": "dask", "address": local_cluster.scheduler_address})))
    _assert_same(_outcome(summary), local_outcome)
    assert len(client.scheduler_info()["workers"]) == 2
    # Both workers served a shard and kept the model between tasks (one per process).
    loaded = client.run(lambda: __import__("tasks.distributed.worker", fromlist=["_STATE"])._STATE.run_key is not None)
    assert sorted(loaded.values()) == [True, True]


@pytest.mark.integration  # two flows, one on the cluster: about a minute
def test_two_dask_workers_race_as_local(tmp_path, cluster):
    """search.mode: racing on Dask: the flow takes the race's decisions from the shards' per-window NLLs."""
    local_cluster, _ = cluster

    def raced(root: Path, execution: dict | None) -> Path:
        path = tiny_pipeline(root, calibration={"samples": 12, "seq_len": 48}, search={
            "mode": "racing", "racing": {"confidence": 0.6, "min_windows": 3, "round_windows": 1}})
        if execution is not None:
            spec = yaml.safe_load(path.read_text())
            spec["execution"] = execution
            path.write_text(yaml.safe_dump(spec))
        return path

    local = _outcome(prune_pipeline(str(raced(tmp_path / "local", None))))
    assert any(not exact for _, exact, _ in local[1].values())  # some candidates left the race
    sharded = prune_pipeline(str(raced(tmp_path / "dask", {"runner": "dask", "address": local_cluster.scheduler_address})))
    _assert_same(_outcome(sharded), local)


@pytest.mark.integration
def test_cluster_started_for_the_run_with_early_abort(tmp_path, local_outcome):
    """execution.workers: the run starts (and stops) its own local cluster; early abort keeps the blocks."""
    summary = prune_pipeline(str(_pipeline(tmp_path, {"runner": "dask", "workers": 2})))
    _assert_same(_outcome(summary), local_outcome)
    bounded = _pipeline(tmp_path / "bounded", {"runner": "dask", "workers": 2})
    blocks, scores, values = _outcome(prune_pipeline(str(bounded), overrides=["search.exact_scores=false"]))
    assert blocks == local_outcome[0] and values == pytest.approx(local_outcome[2], rel=1e-6)
    for key, (value, exact, _) in scores.items():
        assert value <= local_outcome[1][key][0] * (1 + 1e-6) and (not exact or value == pytest.approx(
            local_outcome[1][key][0], rel=1e-6))


@pytest.mark.integration  # about 20 s more: the restarted worker process imports torch and prefect again
def test_worker_killed_mid_step_changes_nothing(tmp_path, cluster, local_outcome):
    local_cluster, client = cluster
    pids = client.run(os.getpid)
    killed: dict[str, object] = {}

    def kill_first_busy_worker() -> None:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline and not killed:
            busy = {w: keys for w, keys in client.processing().items() if any("score_shard" in str(k) for k in keys)}
            for worker, keys in busy.items():
                os.kill(pids[worker], signal.SIGKILL)
                killed.update(worker=worker, pid=pids[worker], keys=keys)
                break
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_busy_worker, daemon=True)
    killer.start()
    summary = prune_pipeline(str(_pipeline(tmp_path, {"runner": "dask", "address": local_cluster.scheduler_address})))
    killer.join(timeout=5)
    assert killed, "no shard task was seen running on a worker"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)  # that worker process is gone
    # The scheduler saw the shard processing on the lost worker, put it back, and had it computed again.
    story = client.run_on_scheduler(
        lambda dask_scheduler: [(str(e[0]), e[1], e[2]) for e in dask_scheduler.transition_log])
    lost = {str(k) for k in killed["keys"]}
    requeued = [k for k, start, finish in story if k in lost and start == "processing" and finish != "memory"]
    assert requeued, story
    assert any(k in requeued and finish == "memory" for k, _, finish in story)
    outcome = _outcome(summary)
    _assert_same(outcome, local_outcome)
    # Nothing partial or doubled: one score row per candidate of every step, one step row per block.
    steps = Catalog(Path(summary["catalog"])).steps(summary["run_id"])
    assert [s.step for s in steps] == [0, 1, 2]
    assert len(outcome[1]) == 8 + 7 + 6
    assert json.loads(json.dumps(summary["blocks"])) == outcome[0]
