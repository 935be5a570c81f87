"""The state directory: created 0700 directly under the root, never through a planted symlink."""

from __future__ import annotations

import os

import pytest

from observed.docker import ensure_state_dir
from observed.errors import Refused


def test_created_with_restrictive_permissions(tmp_path):
    root = tmp_path / "games"
    ensure_state_dir(str(root), str(root / "g1"))
    assert (root / "g1").is_dir()
    assert (root / "g1").stat().st_mode & 0o777 == 0o700
    ensure_state_dir(str(root), str(root / "g1"))  # idempotent


def test_a_symlink_planted_at_the_state_path_is_refused(tmp_path):
    root, target = tmp_path / "games", tmp_path / "elsewhere"
    root.mkdir()
    target.mkdir()
    os.symlink(target, root / "g1")
    with pytest.raises(Refused, match="not a directory"):
        ensure_state_dir(str(root), str(root / "g1"))


def test_a_file_at_the_state_path_is_refused(tmp_path):
    root = tmp_path / "games"
    root.mkdir()
    (root / "g1").write_text("x")
    with pytest.raises(Refused):
        ensure_state_dir(str(root), str(root / "g1"))


@pytest.mark.parametrize("path", ["../x", "g1/deeper", "/etc"])
def test_only_direct_children_of_the_root(tmp_path, path):
    root = tmp_path / "games"
    with pytest.raises(Refused, match="not directly under"):
        ensure_state_dir(str(root), os.path.join(str(root), path))


def test_ownership_goes_to_the_engine_user(tmp_path):
    root = tmp_path / "games"
    ensure_state_dir(str(root), str(root / "g1"), uid=65534)
    assert (root / "g1").stat().st_uid == 65534
