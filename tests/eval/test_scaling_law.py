"""The scaling-law fit recovers known coefficients from synthetic runs (within 0.01), reads
CSV and eval_loss JSON, takes T from the S = 0 runs, and names the file and field of bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from mmcap.eval.scaling_law import fit_runs, read_runs
from tools.fit_scaling_law import main as fit_tool

TRUE = {  # per split: b0, b1 (P), b2 (S), b3 (T); compute law a0, a1 is fitted on C
    "SC": (40.0, -0.08, -0.12, 0.9),
    "UC": (25.0, -0.15, -0.05, 1.3),
}


def _rows(seed=0, noise=0.002):
    rng = np.random.default_rng(seed)
    rows = []
    for split, (b0, b1, b2, b3) in TRUE.items():
        for P in (4.3e8, 1.0e9, 3.5e9, 1.1e10):
            T = float(rng.uniform(3.0, 9.0))  # initial loss differs per model
            for S in (5.12e5, 2.05e6, 5.12e6, 1.02e7):
                y = b0 * P**b1 * S**b2 * T**b3 * float(np.exp(rng.normal(0, noise)))
                rows.append({"split": split, "P": P, "S": S, "T": T, "loss": y, "C": S * P * 6})
    return rows


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_recovers_known_coefficients(tmp_path):
    _write_csv(tmp_path / "runs.csv", _rows())
    laws, compute = fit_runs(read_runs([tmp_path / "runs.csv"]))
    for split, (b0, b1, b2, b3) in TRUE.items():
        fit = laws[split]
        assert abs(fit.coef["P"] - b1) < 0.01
        assert abs(fit.coef["S"] - b2) < 0.01
        assert abs(fit.coef["T"] - b3) < 0.01
        assert abs(np.log(fit.coef["b0"]) - np.log(b0)) < 0.1  # intercept: in log space
        assert fit.ci["S"][0] < b2 < fit.ci["S"][1]
        assert fit.r2 > 0.99
        assert split in compute and compute[split].coef["C"] < 0


def test_json_input_and_initial_loss_from_step_zero(tmp_path):
    lines = []
    for S in (0, 5.12e5, 2.05e6, 5.12e6, 1.02e7):
        for P, T in ((4.3e8, 8.0), (1.0e9, 6.0), (3.5e9, 5.0)):
            ce = T if S == 0 else 30.0 * P**-0.1 * S**-0.1 * T**1.0
            report = {"P": P, "S": S, "C": 6 * P * S}
            lines.append(json.dumps({"splits": {"ST": {"ce": ce}}, "meta": {"compute": report}}))
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(lines))
    laws, _ = fit_runs(read_runs([path]))
    assert abs(laws["ST"].coef["S"] + 0.1) < 0.01 and abs(laws["ST"].coef["T"] - 1.0) < 0.01


def test_tool_prints_and_plots(tmp_path, capsys):
    _write_csv(tmp_path / "runs.csv", _rows())
    assert fit_tool([str(tmp_path / "runs.csv"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "split SC" in out and "R^2" in out
    assert (tmp_path / "out" / "scaling_law.png").stat().st_size > 0
    assert (tmp_path / "out" / "compute_law.png").stat().st_size > 0
    assert set(json.loads((tmp_path / "out" / "fit.json").read_text())["law"]) == {"SC", "UC"}


def test_bad_input_names_file_line_and_field(tmp_path, capsys):
    rows = _rows()
    rows[3]["loss"] = "abc"
    _write_csv(tmp_path / "bad.csv", rows)
    assert fit_tool([str(tmp_path / "bad.csv")]) == 2
    assert "bad.csv:5: field 'loss' is not a number" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no compute report"):
        (tmp_path / "r.json").write_text(json.dumps({"splits": {"SC": {"ce": 1.0}}}))
        read_runs([tmp_path / "r.json"])
