"""A client maps only what a kvstore daemon names its slab: a name with anything after it (a trailing
newline included) is refused before any file is opened."""

from __future__ import annotations

import pytest

from kvstore.slab_segment import MappedSegment, SegmentError


@pytest.mark.parametrize("name", ["tierkv-1-0123456789abcdef\n", "tierkv-1-0123456789abcdef/../x", "../etc/passwd"])
def test_a_name_a_daemon_never_gives_is_refused(tmp_path, name):
    (tmp_path / "tierkv-1-0123456789abcdef").write_bytes(b"\0" * 8192)
    with pytest.raises(SegmentError, match="segment_name"):
        MappedSegment(name, num_slots=1, slot_bytes=4096, slots_offset=4096, shm_dir=tmp_path)
