"""File sizes and ranges stop at MAX_LFS_FILESIZE, as the kernel's do (issue 14, item 7).

Before, ``file_write`` at 2^64−4096 was applied: the page cache grew past 2^63, the client got
EOVERFLOW encoding the reply, remapd never learnt the size and every later ``file ls`` failed.
Now each operation checks its size or range first and refuses it before changing anything:

* write(2): ``rw_verify_area`` refuses a range whose end overflows loff_t (EINVAL);
* truncate(2) and the size a file is created with: ``inode_newsize_ok`` (EINVAL below 0, EFBIG
  past s_maxbytes);
* fallocate(PUNCH_HOLE): ``vfs_fallocate`` (EINVAL for a negative offset or an empty length,
  EFBIG when offset + len passes s_maxbytes).
"""

from __future__ import annotations

import pytest
from helpers import P

from shared.errors import UserError
from shared.units import MAX_LFS_FILESIZE, MAX_PAGE_INDEX

TOP = MAX_LFS_FILESIZE + 1  # 2^63


def files_state(world):
    c = world.collapser
    return (
        {ino: (f.name, f.size, f.nrpages, dict(f.chunks).keys()) for ino, f in c.files.items()},
        c.mem.nr_allocated,
        {ino: f.size for ino, f in world.remapper.files.items()},
    )


def refused(world, op, errno: str) -> None:
    before = files_state(world)
    with pytest.raises(UserError) as err:
        op()
    assert err.value.errno_name == errno, err.value
    assert files_state(world) == before
    world.check()


@pytest.mark.parametrize(
    "offset, length",
    [
        (2**64 - 4096, 8192),  # the write
        (TOP - 4096, 8192),  # starts below 2^63, ends past it
        (TOP - 1, 1),
        (TOP, 0),  # not a loff_t at all
        (0, TOP),
    ],
)
def test_a_write_past_max_lfs_filesize_is_einval(world, offset, length):
    world.file_create("f", P)
    world.file_write("f", 0, P)
    refused(world, lambda: world.file_write("f", offset, length), "EINVAL")
    assert [f["size"] for f in world.collapser.file_ls()] == [P]


def test_a_write_up_to_max_lfs_filesize_is_applied_and_the_remapper_learns_the_size(world):
    world.file_create("f", 0)
    st = world.file_write("f", TOP - 4096, 4095)
    assert st["size"] == MAX_LFS_FILESIZE and st["nrpages"] == 1
    f = world.collapser.by_name["f"]
    assert f.get(MAX_PAGE_INDEX) > 0
    assert world.remapper.files[f.ino].size == MAX_LFS_FILESIZE
    assert world.collapser.file_ls()[0]["size"] == MAX_LFS_FILESIZE
    # And it all goes again.
    assert world.file_truncate("f", 0)["nrpages"] == 0
    world.check()


# A size of 2^63 or more is a negative loff_t to the syscall: EINVAL (the codec refuses it first).
@pytest.mark.parametrize("size, errno", [(TOP, "EINVAL"), (2**64 - 4096, "EINVAL"), (-1, "EINVAL")])
def test_truncate_past_max_lfs_filesize_is_refused(world, size, errno):
    world.file_create("f", 4 * P)
    world.file_write("f", 0, 2 * P)
    refused(world, lambda: world.file_truncate("f", size), errno)


def test_truncate_to_max_lfs_filesize_and_back(world):
    world.file_create("f", 4 * P)
    world.file_write("f", 0, 2 * P)
    assert world.file_truncate("f", MAX_LFS_FILESIZE)["size"] == MAX_LFS_FILESIZE
    assert world.file_truncate("f", P)["nrpages"] == 1


@pytest.mark.parametrize("size, errno", [(TOP, "EINVAL"), (2**64 - 4096, "EINVAL"), (-P, "EINVAL")])
def test_create_past_max_lfs_filesize_is_refused(world, size, errno):
    refused(world, lambda: world.file_create("big", size), errno)
    assert "big" not in world.collapser.by_name and not world.remapper.files


def test_the_model_refuses_sizes_the_codec_cannot_carry(world):
    """Past 64 bits the codec refuses first (EOVERFLOW); the model's own checks hold too."""
    c = world.collapser
    refused(world, lambda: world.call(c, c.file_create("big", 2**64, False)), "EFBIG")
    world.file_create("f", P)
    refused(world, lambda: world.call(c, c.file_write("f", 2**64, 1)), "EINVAL")
    refused(world, lambda: world.call(c, c.file_truncate("f", 2**70)), "EFBIG")
    refused(world, lambda: world.call(c, c.file_punch("f", 0, 2**70)), "EFBIG")


def test_create_at_max_lfs_filesize(world):
    assert world.file_create("big", MAX_LFS_FILESIZE)["size"] == MAX_LFS_FILESIZE
    world.check()


@pytest.mark.parametrize(
    "offset, length, errno",
    [
        (TOP - 4096, 8192, "EFBIG"),
        (0, TOP, "EINVAL"),  # len is a negative loff_t
        (2**64 - 4096, 4096, "EINVAL"),  # offset is a negative loff_t
        (-P, P, "EINVAL"),
        (0, 0, "EINVAL"),
        (0, -P, "EINVAL"),
    ],
)
def test_punch_past_max_lfs_filesize_is_refused(world, offset, length, errno):
    world.file_create("f", 4 * P)
    world.file_write("f", 0, 4 * P)
    refused(world, lambda: world.file_punch("f", offset, length), errno)


def test_punch_up_to_max_lfs_filesize(world):
    world.file_create("f", 4 * P)
    world.file_write("f", 0, 4 * P)
    assert world.file_punch("f", P, MAX_LFS_FILESIZE - P)["nrpages"] == 1
