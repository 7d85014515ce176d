"""Faults and side effects users meet outside the happy path (issue 25)."""
import os
import stat

from bpfree.provenance import atomic_torch_save, atomic_write_json, atomic_write_text


def test_results_are_written_with_the_mode_a_plain_open_gives(tmp_path):
    """mkstemp's 0600 would leave root-owned unreadable files in a user's results/ after the
    README's Docker command; atomic writes end with 0666 minus the umask, as open() does."""
    old = os.umask(0o022)
    try:
        paths = [atomic_write_json(tmp_path / "metrics.json", {"a": 1}),
                 atomic_write_text(tmp_path / "table.md", "x\n"),
                 atomic_torch_save(tmp_path / "run.pt", {"w": 1})]
    finally:
        os.umask(old)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "run.pt", "table.md"]  # no temp files left
