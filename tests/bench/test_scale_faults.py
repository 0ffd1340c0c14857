"""A lean run of ``bench/scale_faults.py``: a pool of workers with a SIGKILL of a quarter of
them and (PostgreSQL) a real server restart; the full-size figures are in docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from tests.conftest import ROOT
from tests.optim_helpers import _pg_admin

pytestmark = [pytest.mark.slow, pytest.mark.db]

_spec = importlib.util.spec_from_file_location(
    "scale_faults", ROOT / "bench" / "scale_faults.py")
scale_faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale_faults)


@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_a_pool_survives_kills_and_a_server_restart(kind):
    if kind == "postgresql":
        _pg_admin().close()  # skips when the server cannot be reached
        if shutil.which("pg_ctlcluster") is None:
            pytest.skip("pg_ctlcluster is not here: cannot restart the server")
    facts = scale_faults.run_one(kind, workers=4, trials=40, epoch_s=0.3, seed=1)
    assert facts["ok"], facts
    assert facts["killed_workers"] == 1
    if kind == "postgresql":
        assert "server_away_s" in facts
