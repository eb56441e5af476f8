"""`cinedit demo` runs end to end on the sample data, resumes, and never silently redoes a finished run."""

from __future__ import annotations

from cinedit.cli import main


def test_demo_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "samples in epoch" in report and "frames/s" in report
    assert (out / "batches.png").stat().st_size > 10_000 and (out / "config.json").is_file()
    capsys.readouterr()
    # A finished run is left alone.
    assert main(["demo", "--out", str(out)]) == 0
    assert "pass --overwrite" in capsys.readouterr().out
    # An interrupted run (no report yet) reuses what it had built.
    (out / "report.md").unlink()
    assert main(["demo", "--out", str(out)]) == 0
    assert "reusing" in capsys.readouterr().out and (out / "report.md").is_file()
