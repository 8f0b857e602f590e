"""The demo (`python -m vijax`) runs and its exact table satisfies the identity."""

import pytest

import vijax.__main__ as demo

RESIDUAL = "ELBO + KL - log Z"


def cells(line):
    return [c.strip() for c in line.strip()[1:-1].split(" | ")]


def exact_table(text):
    """Rows of the first markdown table whose header has the identity-residual column."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if RESIDUAL in line)
    header = cells(lines[start])
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, cells(line))))
    return rows


@pytest.mark.slow
def test_demo_exact_table(capsys):
    demo.main(["--n", "60", "--d", "4"])
    out = capsys.readouterr().out
    assert "n = 60, d = 4" in out
    rows = exact_table(out)
    names = [row["family"] for row in rows]
    assert len(rows) == 3
    for prefix in ("mean_field", "low_rank", "full_rank"):
        assert sum(name.startswith(prefix) for name in names) == 1, names
    log_zs = {row["log Z"] for row in rows}
    assert len(log_zs) == 1  # one model for every family
    for row in rows:
        assert abs(float(row[RESIDUAL])) < 1e-9, row
        assert float(row["KL"]) > 0
        assert float(row["ELBO"]) < float(row["log Z"])
