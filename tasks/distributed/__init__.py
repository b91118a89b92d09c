"""Scoring a search step on Dask workers, through Prefect's DaskTaskRunner (`execution.runner: dask`).

- `shards`: how a step is split (contiguous runs of micro-batches) and how shard results are added up.
- `worker`: what runs on a worker: the model and one prefix-reuse scorer per shard, kept between tasks.
- `scorer`: the flow-side StepScorer that sends a step's candidates to every shard and combines.
- `runner`: the Dask cluster (local or an existing scheduler) and the Prefect task per shard.
"""
