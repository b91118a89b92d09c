"""`pruneflow` command line: validate, run, runs, show, serve, refresh-code.

Bad input exits 2 with one message per problem; nothing else is printed as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tasks.errors import UserError, is_disk_full


def _quiet_prefect_defaults() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def cmd_validate(args: argparse.Namespace) -> int:
    from flows.preflight import resolved_widths
    from pipelines import load_spec

    spec = load_spec(args.pipeline, args.set)
    widths = resolved_widths(spec)  # before the verdict: a share this model cannot take makes the spec invalid
    print(f"{args.pipeline}: valid pipeline '{spec.name}'")
    print("\n".join(widths), end="\n" if widths else "")
    return 0


class _UserErrorsOnce(logging.Filter):
    """Prefect logs a failed run's exception with its traceback; a user error is printed once, by `main`, as
    its message. Only the console handler is filtered: the Prefect API (and the UI) still get the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, UserError) or is_disk_full(error))


def _quiet_user_errors_on_the_console() -> None:
    for handler in logging.getLogger().handlers:  # Prefect's console handler sits on the root logger
        if isinstance(handler, logging.StreamHandler):
            handler.addFilter(_UserErrorsOnce())


def cmd_run(args: argparse.Namespace) -> int:
    from flows import prune_pipeline
    from flows.report import format_outcome
    from pipelines import load_spec

    _quiet_user_errors_on_the_console()

    spec = load_spec(args.pipeline, args.set)
    summary = prune_pipeline(spec, fresh=args.fresh)
    print(format_outcome(summary))
    return 0


def _catalog(path: str):
    from catalog import Catalog, CatalogError

    if not Path(path).exists():
        raise CatalogError(f"no catalog at {path}; run a pipeline first or pass --catalog PATH")
    return Catalog(path)


def cmd_runs(args: argparse.Namespace) -> int:
    from catalog.report import format_runs

    print(format_runs(_catalog(args.catalog).run_summaries()))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from catalog import CatalogError
    from catalog.report import format_show, show_json

    catalog = _catalog(args.catalog)
    matches = [s.run_id for s in catalog.run_summaries() if s.run_id.startswith(args.run_id)]
    if len(matches) != 1:
        found = "no run" if not matches else f"{len(matches)} runs"
        raise CatalogError(f"{found} with id starting '{args.run_id}' in {args.catalog}; see `pruneflow runs`")
    run_id = matches[0]
    run = catalog.get_run(run_id)
    artifacts = catalog.artifacts(run_id)
    rows = (run, catalog.steps(run_id), catalog.scores(run_id), catalog.evaluations(run_id), artifacts)
    if args.json:
        print(show_json(*rows))
        return 0
    print(format_show(*rows, verbose=args.verbose))
    report = next((Path(a.path) for a in artifacts if a.kind == "report-md"), None)
    if args.verbose and report is not None and report.is_file():
        print(f"\n{'=' * 20} report {report} {'=' * 20}\n")
        print(report.read_text())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve_pipeline

    serve_pipeline(args.pipeline, cron=args.cron, overrides=args.set)
    return 0


def cmd_refresh_code(args: argparse.Namespace) -> int:
    from tasks.export import refresh_code

    written = refresh_code(args.checkpoint)
    print(f"{args.checkpoint}: rewrote {', '.join(written)} (weights and config.json unchanged)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pruneflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_text in (
        ("validate", cmd_validate, "check a pipeline YAML; exit 2 with every error"),
        ("run", cmd_run, "run or resume a pipeline"),
        ("serve", cmd_serve, "serve a pipeline as a Prefect deployment"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("pipeline")
        p.add_argument("--set", action="append", default=[], metavar="dotted.key=value")
        p.set_defaults(fn=fn)
    sub.choices["run"].add_argument("--fresh", action="store_true", help="discard this run's results and start over")
    sub.choices["serve"].add_argument("--cron", default=None, help="cron schedule, e.g. '0 3 * * *'")
    runs = sub.add_parser("runs", help="list runs in a catalog")
    runs.set_defaults(fn=cmd_runs)
    show = sub.add_parser("show", help="show one run: spec, steps, scores, evaluations, artifacts")
    show.add_argument("run_id")
    show.add_argument("--verbose", action="store_true",
                      help="also fingerprints, the whole spec, the stored summary, artifacts and report.md")
    show.add_argument("--json", action="store_true", help="everything the catalog holds on the run, as JSON")
    show.set_defaults(fn=cmd_show)
    refresh = sub.add_parser("refresh-code", help="rewrite a pruned checkpoint's modeling code with this release's")
    refresh.add_argument("checkpoint")
    refresh.set_defaults(fn=cmd_refresh_code)
    for p in (runs, show):
        p.add_argument("--catalog", default="outputs/catalog.duckdb")
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_prefect_defaults()
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except UserError as exc:
        print(f"pruneflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _reader_went_away()


# What a shell reports for a process ended by SIGPIPE (128 + 13), as `pruneflow show | head` expects.
EXIT_BROKEN_PIPE = 141


def _reader_went_away() -> int:
    """The reader of stdout closed it (`| head`): stop quietly. stdout now points at /dev/null, so the
    interpreter's final flush of what is still buffered does not fail a second time."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
