"""Search progress: per-step candidate totals from the strategy's registered count, time left for the step
and the run, the leading block, and step numbers as the catalog's."""

from flows.progress import SearchProgress, clock
from tasks.score import CandidateScore
from tasks.search import StepRecord
from tasks.search.registry import expected_candidates


def _progress(strategy: str, first: int, steps: int, known=None) -> SearchProgress:
    def per_step(step):
        before = expected_candidates(strategy, first, step) if step else 0
        return expected_candidates(strategy, first, step + 1) - before

    return SearchProgress(per_step, expected_candidates(strategy, first, steps), steps, True, known=known)


def _score(block: str, value: float) -> CandidateScore:
    return CandidateScore(block, value, 64, 0.01, True)


def test_iterative_bar_counts_each_steps_candidates_and_names_the_leader(capsys):
    progress = _progress("iterative", 8, 3)
    for k in range(8):
        progress.on_score(0, _score(f"layers.{k}", 20.0 - k))
    text = progress.status(progress._step_total(0))
    assert text.startswith("8/8 candidates") and "leading layers.7 13" in text and "run left" in text
    progress.on_step(0, {}, StepRecord(0, "layers.7", 13.0, 100))
    assert "step 0 (1 of 3): removed layers.7" in capsys.readouterr().err  # the catalog's step number
    progress.on_score(1, _score("layers.0", 30.0))
    assert progress.step_label(1) == "search step 1 (2 of 3)"
    assert progress.status(progress._step_total(1)).startswith("1/7 candidates")
    assert progress.run_total - progress.run_done == 8 + 7 + 6 - 9


def test_one_shot_scores_everything_at_step_0_and_resume_counts_known_scores():
    progress = _progress("one_shot", 8, 3, known={0: 5})
    progress.on_score(0, _score("layers.5", 1.0))
    assert progress.status(progress._step_total(0)).startswith("6/8 candidates")
    consecutive = _progress("consecutive", 30, 6)
    consecutive.on_score(0, _score("layers.0", 1.0))
    assert consecutive._step_total(0) == 25  # every segment of 6 layers, all at step 0


def test_clock():
    assert clock(142) == "02:22" and clock(3723) == "1:02:03"


def test_byte_meter_reports_megabytes_every_64_and_at_the_end():
    from tasks.refs import MB, ByteMeter

    reports = []
    meter = ByteMeter(lambda *args: reports.append(args), "hashing model", 200 * MB + 5)
    for _ in range(200):
        meter.add(MB)
    meter.add(5)  # the last 5 bytes: the end, 201 MB rounded up
    assert reports == [("hashing model", 64, 201, "MB", ""), ("hashing model", 128, 201, "MB", ""),
                       ("hashing model", 192, 201, "MB", ""), ("hashing model", 201, 201, "MB", "")]


def test_tokenizing_reports_documents_per_batch():
    from tasks.windows import CHUNKS_PER_BATCH, DOCS_PER_CHUNK, tokenize_stream
    from tests.tiny import tiny_tokenizer

    docs = [f"document {k}" for k in range(2 * DOCS_PER_CHUNK * CHUNKS_PER_BATCH + 3)]
    seen = []
    stream = tokenize_stream(docs, tiny_tokenizer(), lambda done, total: seen.append((done, total)))
    per_batch = DOCS_PER_CHUNK * CHUNKS_PER_BATCH
    assert seen == [(per_batch, len(docs)), (2 * per_batch, len(docs)), (len(docs), len(docs))]
    assert stream.equal(tokenize_stream(docs, tiny_tokenizer()))


def test_calibration_curve_counts_the_windows_of_every_pass(tmp_path):
    from tasks.evaluate import calibration_trajectory
    from tasks.load import ModelSpec
    from tasks.windows import save_windows
    from tests.tiny import tiny_checkpoint, tiny_windows

    model = tiny_checkpoint(tmp_path / "m")
    windows = save_windows(tiny_windows(samples=3, seq_len=16), tmp_path / "w.safetensors", "calibration")
    spec = ModelSpec(source=str(model), device="cpu")
    seen = []
    curve = calibration_trajectory(str(model), spec, windows, ("layers.1", "layers.2.mlp"), 2,
                                   on_windows=lambda done, total: seen.append((done, total)))
    assert seen == [(done, 9) for done in (2, 3, 5, 6, 8, 9)]  # 3 passes of 3 windows, micro-batches of 2
    assert curve == calibration_trajectory(str(model), spec, windows, ("layers.1", "layers.2.mlp"), 2)


def test_a_delayed_bar_shows_only_what_takes_long(capsys):
    from flows.progress import Parts

    quick, slow = Parts("load", delay=60.0), Parts("load")
    for done in (1, 2):
        quick.update("hashing a", done, 2, "MB")
        slow.update("hashing b", done, 2, "MB")
    err = capsys.readouterr().err
    assert "load: hashing b: 2/2 MB" in err and "hashing a" not in err
