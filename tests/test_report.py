"""`lowbit study` + `lowbit report` end to end on digits; the page renders in headless Chromium."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.errors import DataError
from lowbit.report.studies import build_report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHECK_IMAGES = """<script>window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-images', loaded + '/' + images.length);
});</script>"""

STUDY = """
name: digits-bits
trial: test_studies:digits_trial
state_metric: loss
base: {lr: 0.5, steps: 30, bits: 32}
axes:
  - {name: bits, keys: [bits], values: [1, 32]}
  - name: variant
    values: {plain: {}, crash: {crash: true}}
"""


def _chromium(*args: str, user_dir: Path) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={user_dir}"]
    done = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def test_study_cli_then_report_renders_every_image(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(STUDY)
    out = tmp_path / "results"
    argv = ["study", str(config), "--workers", "2", "--quiet", "--allow-import-trials", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 trials ok, 2 failed" in printed and "RuntimeError: boom on purpose" in printed
    assert main(["report", str(out)]) == 0
    page = out / "report.html"
    assert capsys.readouterr().out.strip() == str(page)

    html = page.read_text()
    with open(out / "results.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["status"] == "ok"]
    for row in rows:
        assert f"<td>{row['name']}</td>" in html
        assert f"<td>{float(row['accuracy']):.4g}</td>" in html
    # 1 accuracy-vs-bits plot + 1 loss-curve plot + (sample grid + histogram) per ok trial
    assert html.count("<img ") == 2 + 2 * len(rows)
    assert "2 ok, 2 failed" in html and "2 convergent" in html

    shutil.copytree(out, tmp_path / "all" / "first")
    shutil.copytree(out, tmp_path / "all" / "second")
    pages = build_report(tmp_path / "all")
    assert [p.relative_to(tmp_path / "all").as_posix() for p in pages] == [
        "first/report.html", "second/report.html", "index.html"]
    assert 'href="second/report.html"' in pages[-1].read_text()

    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed")
    checked = tmp_path / "checked.html"
    checked.write_text(html.replace("</body>", CHECK_IMAGES + "</body>"))
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", checked.as_uri(),
                    user_dir=tmp_path / "chrome")
    assert re.search(r'data-images="(\d+)/(\d+)"', dom).groups() == (str(html.count("<img ")),) * 2


def test_report_of_a_directory_without_studies_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="no study results"):
        build_report(tmp_path)


def test_scores_spanning_a_wide_range_get_a_log_axis():
    import matplotlib.pyplot as plt

    from lowbit.report.plots import LOG_SCALE_SPAN, log_y_if_wide

    for values, expected in (([15.8, 20.0, 992.0], "log"), ([15.8, 20.0, 60.0], "linear"),
                             ([-0.01, 5.0, 900.0], "linear"), ([1.0, LOG_SCALE_SPAN], "linear")):
        figure, axis = plt.subplots()
        log_y_if_wide(axis, values)
        assert axis.get_yscale() == expected, values
        plt.close(figure)
