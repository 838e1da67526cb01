"""`make figures` (cnkit.surfaces.report): notebooks run once per source and parameters, and the index puts the
paper's claim, the kit's measurement and the verdict beside each notebook's figures and tables."""

import json

import nbformat

from cnkit.surfaces import report


def _notebook(path, body: str, outputs, key_figures=()):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile: str = "auto"  # profile\nout_dir: str = "out"  # where')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# 99 · A test notebook"), params, nbformat.v4.new_code_cell(body)]
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "cnkit": {"outputs": list(outputs), "key_figures": list(key_figures)}}
    nbformat.write(nb, path)
    return path


def test_a_notebook_runs_once_per_source_and_parameters(tmp_path):
    body = ("from pathlib import Path\nimport json\nout = Path(out_dir); out.mkdir(parents=True, exist_ok=True)\n"
            "(out / 'summary.json').write_text(json.dumps({'profile': profile}))")
    path = _notebook(tmp_path / "99_test.ipynb", body, ["summary.json"])
    run_dir = tmp_path / "reports"
    assert report.run_notebook(path, run_dir, "smoke")[0] == "ran"
    assert json.loads((run_dir / "99_test" / "summary.json").read_text()) == {"profile": "smoke"}
    assert report.run_notebook(path, run_dir, "smoke")[0] == "cached"  # an interrupted make figures resumes
    assert report.run_notebook(path, run_dir, "full")[0] == "ran"  # other parameters: run again


def test_a_notebook_runs_again_when_the_shipped_data_it_reads_is_rebuilt(tmp_path):
    path = _notebook(tmp_path / "99_test.ipynb", "pass", [])
    run_dir, data = tmp_path / "reports", tmp_path / "data"
    (data / "forecast-runs").mkdir(parents=True)
    (data / "forecast-runs" / "README.md").write_text("| run | converged |\n| a | 100 |\n")
    assert report.run_notebook(path, run_dir, "smoke", data_dir=data)[0] == "ran"
    assert report.run_notebook(path, run_dir, "smoke", data_dir=data)[0] == "cached"
    (data / "forecast-runs" / "README.md").write_text("| run | converged |\n| a | 125 |\n")  # make forecast-runs again
    assert report.run_notebook(path, run_dir, "smoke", data_dir=data)[0] == "ran"


def test_the_index_shows_claim_measurement_verdict_figures_and_tables(tmp_path):
    path = _notebook(tmp_path / "99_test.ipynb", "pass", ["fig.png", "extra.png", "table.md", "summary.json"],
                     key_figures=["fig.png"])
    out = tmp_path / "reports" / "99_test"
    out.mkdir(parents=True)
    (out / "fig.png").write_bytes(b"png")
    (out / "extra.png").write_bytes(b"png")
    (out / "table.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    (out / "summary.json").write_text(json.dumps({"paper_claim": "X beats Y", "kit_result": "X 0.5, Y 0.6",
                                                  "held": False, "checks": {"X > Y": False}}))
    text = report.write_index(tmp_path / "reports", [path]).read_text()
    assert "## 99 · A test notebook" in text
    assert "**Paper:** X beats Y" in text and "**Kit (measured):** X 0.5, Y 0.6" in text
    assert "**Held:** **no** (X > Y: no)" in text
    assert "![fig.png](99_test/fig.png)" in text and "[extra.png](99_test/extra.png)" in text
    assert "| 1 | 2 |" in text


def test_the_index_states_make_figures_own_time_over_interrupted_sittings(tmp_path):
    path = _notebook(tmp_path / "99_test.ipynb", "pass", [])
    run_dir = tmp_path / "reports"
    first = report.Clock(run_dir, from_scratch=True)
    first.t0 -= 600  # ten minutes in, then interrupted: the file says so already
    first.record_notebook("99_test", "ran", 1.0)
    first.stop()  # the interrupted process saves no more (its heartbeat would overwrite the resumed record)
    assert json.loads((run_dir / "timing.json").read_text())["sittings"][0]["wall_s"] >= 600
    assert "**10 min** end to end so far" in report.write_index(run_dir, [path]).read_text()
    second = report.Clock(run_dir, from_scratch=False)  # make figures again: it resumes the same record
    second.t0 -= 300
    second.save(finished=True)
    text = report.write_index(run_dir, [path]).read_text()
    assert "ran from scratch" in text and "in 2 sittings" in text and "**15 min** end to end," in text
    assert "machines that differed" not in text
    record = json.loads((run_dir / "timing.json").read_text())  # the second sitting ran on another machine
    record["sittings"][1]["hardware"] = "another CPU"
    (run_dir / "timing.json").write_text(json.dumps(record))
    text = report.write_index(run_dir, [path]).read_text()
    assert "machines that differed between sittings:" in text and "another CPU (5 min)" in text
    third = report.Clock(run_dir, from_scratch=False)  # after a finished one: a new record
    third.save(finished=True)
    assert "resuming an earlier report" in report.write_index(run_dir, [path]).read_text()


def test_a_failed_notebook_leaves_its_sitting_unfinished_and_the_rerun_resumes_it(tmp_path, monkeypatch):
    path = _notebook(tmp_path / "99_test.ipynb", "import os\nassert os.environ.get('CNKIT_TEST_FIXED'), 'broken'", [])
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report, "notebooks", lambda only=None: [path])
    assert report.main(["--profile", "smoke", "--run", "r"]) == 1
    timing = tmp_path / "reports" / "r" / "timing.json"
    sittings = json.loads(timing.read_text())["sittings"]
    assert len(sittings) == 1 and sittings[0]["finished"] is None and sittings[0]["wall_s"] > 0
    monkeypatch.setenv("CNKIT_TEST_FIXED", "1")  # the user fixes the cause and runs make figures again
    assert report.main(["--profile", "smoke", "--run", "r"]) == 0
    sittings = json.loads(timing.read_text())["sittings"]
    assert len(sittings) == 2 and sittings[1]["finished"] and "99_test" in sittings[1]["notebooks"]
