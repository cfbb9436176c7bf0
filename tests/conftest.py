"""Shared test helpers. `sst2_dir()` finds the real GLUE SST-2 data beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = REPO.parent / "shared" / "data" / "glue"


def sst2_dir() -> Path:
    """`<repo>/../shared/data/glue` if it holds SST-2/train.tsv.

    Otherwise skip the calling test, or fail it when HFL_REQUIRE_DATA=1.
    """
    if (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        return GLUE_DIR
    reason = (f"real GLUE SST-2 data not found at {GLUE_DIR / 'SST-2' / 'train.tsv'} "
              "(the shared data folder beside the repo's root)")
    if os.environ.get("HFL_REQUIRE_DATA") == "1":
        pytest.fail(f"HFL_REQUIRE_DATA=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(name="sst2_dir")
def sst2_dir_fixture() -> Path:
    """Fixture form of `sst2_dir()`."""
    return sst2_dir()
