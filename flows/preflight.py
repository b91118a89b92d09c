"""Checks that need no Prefect: bad input fails in seconds, before a server starts or a file is written."""

from __future__ import annotations

from pathlib import Path


from flows.keys import identity_hash
from flows.outputs import check_catalog_file, check_owner, check_writable_folder
from flows.progress import Parts
from pipelines import PipelineSpec
from tasks.export import TokenizerError, load_tokenizer, model_config
from tasks.windows import leading_stream
from tasks.export.common import DTYPES
from tasks.load import load_stage, resolve_device, resolve_dtype
from tasks.errors import UserError
from tasks.registry import MissingExtra, Plugin
from tasks.sources import SourceError, load_texts


def _texts(source: str, part: str, field: str) -> list[str]:
    """The texts of a source, with a refusal that names the spec field it came from."""
    try:
        return load_texts(source, part)
    except SourceError as exc:
        raise SourceError(f"{field}: {exc}") from exc


def _enough_tokens(texts: list[str], tokenizer, needed: int, what: str, hint: str) -> None:
    # Only as many leading documents as the need requires are tokenized, so this stays cheap.
    have = leading_stream(texts, tokenizer, needed).numel()
    if have < needed:
        raise SourceError(f"{what} gives {have} tokens; need at least {needed}; {hint}")


# Tokenizer, config and generation files beside the weights.
_CHECKPOINT_EXTRA_BYTES = 32_000_000


def checkpoint_bytes(params: int, dtype: str, device: str) -> int:
    """What one checkpoint of the unpruned model takes (a pruned one is smaller; one is written at a time)."""
    return params * DTYPES[resolve_dtype(dtype, device)].itemsize + _CHECKPOINT_EXTRA_BYTES


def preflight(spec: PipelineSpec, fresh: bool = False) -> None:
    from catalog import Catalog

    check_catalog_file(spec.catalog_path())
    catalog = Catalog(spec.catalog_path()) if spec.catalog_path().exists() else None

    def status(run_id: str) -> str | None:
        row = catalog.get_run(run_id) if catalog is not None and not fresh else None
        return row.status if row else None

    check_owner(Path(spec.output_dir), spec.name, identity_hash(spec), status)
    check_extras(spec)
    device = resolve_device(spec.model.device)
    if spec.execution.device and spec.execution.address is None:  # a local cluster's workers run here
        resolve_device(spec.execution.device, "execution.device")
    # Before the flow starts (no run to attach an artifact to): the terminal's bars only, and only for what takes
    # long, so that a refused input prints its one message and nothing else.
    model = load_stage(spec.model, spec.score, spec.search, Parts("load", delay=2.0).update)
    _check_streaming(spec, model.path, device)
    check_writable_folder(Path(spec.output_dir), "output_dir", checkpoint_bytes(model.params, spec.model.dtype, device))
    try:
        tokenizer = load_tokenizer(model.path, spec.model.trust_remote_code)
    except TokenizerError as exc:
        raise TokenizerError(f"model.source: {exc}") from exc
    cal = spec.calibration
    config = model_config(Path(model.path), spec.model.trust_remote_code)
    _check_lengths(spec, config)
    _check_format(spec, config, tokenizer)
    for source, count in cal.sources():
        _enough_tokens(
            _texts(source, "calibration", "calibration.dataset"), tokenizer, count * cal.seq_len,
            f"calibration.dataset {source}", "use a longer dataset or fewer calibration.samples / a shorter seq_len",
        )
    for dataset in spec.evaluate.datasets:
        _enough_tokens(
            _texts(dataset, "evaluation", "evaluate.datasets"), tokenizer, spec.evaluate.seq_len,
            f"evaluate.datasets entry {dataset}", "use a longer dataset or a shorter evaluate.seq_len",
        )
    _check_recovery(spec, model.path, tokenizer)
    if spec.width is not None:
        _check_width(spec, model.path)
    if spec.evaluate.tasks:
        from tasks.downstream import check_tasks

        check_tasks(spec.evaluate.tasks, spec.evaluate.task_paths)


class WindowTooLong(UserError):
    pass


def _check_streaming(spec: PipelineSpec, model_path: str, device: str) -> None:
    """A model larger than model.memory_budget_gb streams (tasks.stream): refused now, naming the settings
    whose stages still load the model whole, and a budget below the largest piece with that piece's size."""
    from tasks.stream.open import NotStreamed, check_budget, residency
    from tasks.stream.budget import gb

    dtype = resolve_dtype(spec.model.dtype, device)
    plan = residency(model_path, dtype, device, spec.model.memory_budget_gb)
    if not plan.streams:
        return
    check_budget(model_path, dtype, device, plan)
    unstreamed = streaming_refusals(spec)
    if unstreamed:
        raise NotStreamed(
            f"model.memory_budget_gb: the model does not fit ({plan.describe()}), and these settings need it "
            f"whole: {'; '.join(unstreamed)}; change them, or set model.memory_budget_gb to at least "
            f"{gb(plan.weight_bytes)} on a machine with that much memory")


def streaming_refusals(spec: PipelineSpec) -> list[str]:
    """The settings of `spec` whose stages do not run on streamed weights yet, each with why."""
    from tasks.export.registry import get_format
    from tasks.search_stage import SearchSections, why_not_streamed

    found = []
    search = why_not_streamed(SearchSections(spec.model, spec.score, spec.search), spec.execution)
    if search:
        found.append(f"the search: {search}")
    if spec.width is not None:
        found.append("width (its metrics and surgery read whole layers)")
    if spec.recover.method != "none":
        found.append(f"recover.method '{spec.recover.method}' (recovery trains the whole model)")
    if spec.prune.format != "auto" and not get_format(spec.prune.format).streams:
        found.append(f"prune.format '{spec.prune.format}' (it writes from the whole state dict)")
    if spec.evaluate.tasks:
        found.append("evaluate.tasks (lm-evaluation-harness runs the whole model)")
    return found


def _check_format(spec: PipelineSpec, config, tokenizer) -> None:
    """A format that cannot hold this model's pruned form at all is refused now, not after the search."""
    from tasks.export import ExportError, get_format

    if spec.prune.format != "auto":
        problem = get_format(spec.prune.format).source_problem(config, tokenizer)
        if problem:
            raise ExportError(f"prune.format: {problem}")


def _check_lengths(spec: PipelineSpec, config) -> None:
    """Calibration and evaluation windows no longer than the model's positions (a learned position table
    would index past its end; rotary models were never trained that far)."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return
    for field, length in (("calibration.seq_len", spec.calibration.seq_len), ("evaluate.seq_len", spec.evaluate.seq_len)):
        if length > positions:
            raise WindowTooLong(f"{field} {length} exceeds the model's {positions} positions "
                                f"(max_position_embeddings); use at most {positions}")


def chosen_plugins(spec: PipelineSpec) -> list[tuple[str, Plugin]]:
    """Every plugin the spec chooses, with the field that chooses it."""
    import tasks.evaluate  # noqa: F401  (registers the built-in evaluators)
    from tasks.evaluation import EVALUATORS
    from tasks.export.registry import get_format
    from tasks.recover import get_recovery
    from tasks.score import METRICS

    chosen: list[tuple[str, Plugin]] = [("score.metric", METRICS[spec.score.metric])]
    if spec.recover.method != "none":
        chosen.append(("recover.method", get_recovery(spec.recover.method)))
    if spec.prune.format != "auto":
        chosen.append(("prune.format", get_format(spec.prune.format)))
    chosen += [("evaluate", e) for e in EVALUATORS.values() if e.wanted(spec.evaluate)]
    return chosen


def check_extras(spec: PipelineSpec) -> None:
    """Refuse, before anything is written, a chosen method whose optional extra is not installed."""
    problems = [p for field, plugin in chosen_plugins(spec) if (p := plugin.missing_extra(field))]
    if problems:
        raise MissingExtra("; ".join(problems))


def _check_recovery(spec: PipelineSpec, model_path: str, tokenizer) -> None:
    from tasks.recover import RecoveryCheck, get_recovery

    if spec.recover.method == "none":
        return

    def enough_tokens(source: str, needed: int, setting: str) -> None:
        _enough_tokens(_texts(source, "calibration", "recover"), tokenizer, needed, f"recover training source {source}",
                       f"use a longer dataset or a shorter {setting}")

    positions = getattr(model_config(Path(model_path), spec.model.trust_remote_code), "max_position_embeddings", None)
    env = RecoveryCheck(prune_format=spec.prune.format, positions=positions, enough_tokens=enough_tokens)
    get_recovery(spec.recover.method).check(spec.recover, env)


def resolved_widths(spec: PipelineSpec) -> list[str]:
    """Lines saying what each share of the width shape resolves to on the source model (its config only, no
    weights); none, and nothing read, when the shape gives counts only."""
    from tasks.load import source_config
    from tasks.surgery.width import config_widths
    from tasks.width.plan import share_record

    shape = None if spec.width is None else spec.width.shape
    if shape is None or not shape.shares():
        return []
    config = source_config(spec.model)
    record = share_record(shape, config_widths(config))
    pad = max(len(name) for name in record)
    return [f"width.shape resolved on {spec.model.source} ({config.model_type}; a share is of the source model's "
            "width, rounded to the nearest count):",
            *(f"  {name.ljust(pad)}  {r['share']} of {r['of']} -> {r['count']}" for name, r in record.items())]


def _check_width(spec: PipelineSpec, model_path: str) -> None:
    """The width section against the model and the export: family, sizes, format, granularity."""
    from tasks.export.registry import get_format
    from tasks.surgery import architecture_for
    from tasks.surgery.width import WidthError, config_widths
    from tasks.width import WIDTH_STRATEGIES, resolve_shape

    config = model_config(Path(model_path), spec.model.trust_remote_code)
    layout = architecture_for(config.model_type).width
    if layout is None:
        raise WidthError(f"width: model_type '{config.model_type}' has no heads and channels pruneflow can slice "
                         "(fused projections or experts); remove the width section")
    # Shares resolve on the source model's widths, so a published recipe runs unchanged on any model of a family.
    shape = None if spec.width.shape is None else resolve_shape(spec.width.shape, config_widths(config))
    strategy = WIDTH_STRATEGIES[spec.width.strategy]
    sublayers = spec.score.granularity != "layer" and getattr(spec.search.target, "blocks", None) != 0
    if strategy.whole_layers and sublayers:
        raise WidthError(f"width.strategy {spec.width.strategy} works on whole layers, but score.granularity "
                         f"'{spec.score.granularity}' lets the depth search remove halves; use score.granularity: "
                         "layer or search.target.blocks: 0")
    problem = strategy.check and strategy.check(getattr(spec.width, spec.width.strategy, None), config)
    if problem:
        raise WidthError(problem)
    if spec.prune.format != "auto":
        problem = get_format(spec.prune.format).width_target_problem(
            {} if shape is None else shape.model_dump(exclude_none=True), spec.width.strategy, config_widths(config))
        if problem:
            raise WidthError(problem)
    if shape is None:  # a params_ratio: its shapes are found on the model and keep heads where they must
        return
    if not layout.hidden and shape.hidden_size:
        raise WidthError(f"width.shape.hidden_size: model_type '{config.model_type}' scales by a constant of its hidden "
                         "size, so its hidden channels cannot be pruned; leave hidden_size out")
    if not layout.heads and (shape.num_attention_heads or shape.num_key_value_heads):
        raise WidthError(f"width.shape: model_type '{config.model_type}' normalises queries and keys over all heads, "
                         "so heads cannot be pruned exactly; give only intermediate_size")
