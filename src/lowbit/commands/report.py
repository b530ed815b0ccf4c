"""``lowbit report RESULTS_DIR``: one HTML page per study (tables, plots, samples, histograms)."""

from __future__ import annotations


def register(sub) -> None:
    """Add ``lowbit report`` to the root parser."""
    parser = sub.add_parser(
        "report", help="write the HTML report of study results",
        description="Write RESULTS_DIR/report.html for a study directory written by `lowbit study` "
        "(or one page per study, plus index.html, for a directory of studies).")
    parser.add_argument("results_dir", help="a study's results directory, or a directory of them")
    parser.set_defaults(func=run_report)


def run_report(args) -> int:
    """Build the pages and print their paths."""
    from lowbit.report.studies import build_report

    for page in build_report(args.results_dir):
        print(page)
    return 0
