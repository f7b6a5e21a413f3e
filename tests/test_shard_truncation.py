"""A shard cut short anywhere is refused, naming the shard, the byte where it ends and the last member read; never
indexed as the samples before the cut. Python's tarfile ends its member list without an error at a header cut
short, a header boundary or the end of the file, so before the index checked the end-of-archive marker a shard cut
there was read as 25 of its 100 samples. Covered: inside a header, at a header boundary (between members, and
between two members of one sample), inside member data, inside a member's padding, the end marker missing in full,
in part, or cut inside its second block; a block that is not a header; and the intact shards (with and without
the record padding after the marker) index every sample."""
import io
import re
import tarfile

import pytest

from maect.dataloading.images import DataError
from maect.dataloading.shards import index_shard

N = 6


def write_shard(path) -> list[tuple[str, int, int, int]]:
    """N samples (a .cls and a 700-byte .png each: 1 and 188 bytes of padding); returns per member (name, header
    offset, data offset, data end) and writes the shard as tarfile does (end marker + padding to 10 KiB)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(N):
            for ext, data in (("cls", str(i % 3).encode()), ("png", bytes([i]) * 700)):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size, info.mtime = len(data), 0
                tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        return [(m.name, m.offset, m.offset_data, m.offset_data + m.size) for m in tf.getmembers()]


def cut(src, dst, at: int) -> str:
    with open(src, "rb") as f:
        blob = f.read()
    with open(dst, "wb") as f:
        f.write(blob[:at])
    return str(dst)


def test_every_truncation_point_is_refused_naming_shard_offset_and_member(tmp_path):
    src = tmp_path / "train-000000.tar"
    layout = write_shard(src)
    eoa = -(-layout[-1][3] // 512) * 512                     # the end marker starts after the last padding
    assert len(index_shard(str(src)).keys) == N
    assert len(index_shard(cut(src, tmp_path / "exact.tar", eoa + 1024)).keys) == N   # no record padding: fine
    k = len(layout) // 2                                     # a member in the middle: sample 3's .cls
    name, head, data, dend = layout[k]
    prev = layout[k - 1][0]
    cases = {
        "inside a header": (head + 100, prev),
        "at a header boundary (between samples)": (head, prev),
        "at a header boundary (inside a sample)": (layout[k + 1][1], name),
        "inside the last member's padding": (layout[-1][3] + 50, layout[-1][0]),
        "end marker missing": (eoa, layout[-1][0]),
        "one of the two end blocks": (eoa + 512, layout[-1][0]),
        "inside the second end block": (eoa + 700, layout[-1][0]),
        "inside a middle member's padding": (layout[k + 1][3] + 50, layout[k + 1][0]),
    }
    for what, (at, last) in cases.items():
        path = cut(src, tmp_path / "cut.tar", at)
        with pytest.raises(DataError, match=re.escape(f"shard {path!r} is truncated")) as e:
            index_shard(path)
        msg = str(e.value)
        assert f"ends at byte {at}" in msg, (what, msg)
        assert f"after member {last!r}" in msg, (what, msg)
    path = cut(src, tmp_path / "data.tar", layout[k + 1][2] + 100)     # inside member data: refused as before
    with pytest.raises(DataError, match=r"is truncated at byte \d+: member '000003.png'"):
        index_shard(path)


def test_a_block_that_is_not_a_header_is_refused(tmp_path):
    src = tmp_path / "val-000000.tar"
    layout = write_shard(src)
    head = layout[4][1]
    blob = bytearray(open(src, "rb").read())
    blob[head:head + 512] = b"x" * 512                      # a header overwritten: its checksum fails
    open(src, "wb").write(bytes(blob))
    with pytest.raises(DataError, match=rf"the block at byte {head} \(after member '000001.png'\) is neither a tar "
                                        r"header nor the end marker"):
        index_shard(str(src))
