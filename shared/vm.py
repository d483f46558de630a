"""The names of the user-visible VM interface both actors and the client share: mmap protections,
madvise advice, and the /proc/PID/smaps fields we print."""

from __future__ import annotations

import enum

PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4


class Prot(enum.StrEnum):
    """mmap's and mprotect's protections by their thpctl names."""

    NONE = "none"
    R = "r"
    RW = "rw"
    RX = "rx"
    RWX = "rwx"


# Each protection's PROT_* bits (keys are Prot members, which equal their plain strings).
PROTS: dict[str, int] = {
    Prot.NONE: 0,
    Prot.R: PROT_READ,
    Prot.RW: PROT_READ | PROT_WRITE,
    Prot.RX: PROT_READ | PROT_EXEC,
    Prot.RWX: PROT_READ | PROT_WRITE | PROT_EXEC,
}


class Advice(enum.StrEnum):
    """The madvise advice (MADV_* without the prefix, lower case), the one table of them: the
    model, thpctl, the scenario language and the kernel backend, traces and the recorder all take
    theirs from here. ``madv`` is the MADV_* value (include/uapi/asm-generic/mman-common.h);
    ``vm_flags``: the advice changes vm_flags (madvise_vma_behavior -> madvise_update_vma), so it
    takes mmap_lock for write (madvise_lock) and may split and merge VMAs."""

    madv: int
    vm_flags: bool

    def __new__(cls, value: str, madv: int, vm_flags: bool = False) -> Advice:
        member = str.__new__(cls, value)
        member._value_ = value
        member.madv = madv
        member.vm_flags = vm_flags
        return member

    NORMAL = "normal", 0, True
    RANDOM = "random", 1, True
    SEQUENTIAL = "sequential", 2, True
    WILLNEED = "willneed", 3
    DONTNEED = "dontneed", 4
    FREE = "free", 8
    REMOVE = "remove", 9
    DONTFORK = "dontfork", 10, True
    DOFORK = "dofork", 11, True
    HUGEPAGE = "hugepage", 14, True
    NOHUGEPAGE = "nohugepage", 15, True
    DONTDUMP = "dontdump", 16, True
    DODUMP = "dodump", 17, True
    WIPEONFORK = "wipeonfork", 18, True
    KEEPONFORK = "keeponfork", 19, True
    COLD = "cold", 20
    PAGEOUT = "pageout", 21
    POPULATE_READ = "populate_read", 22
    POPULATE_WRITE = "populate_write", 23
    COLLAPSE = "collapse", 25


ADVICE = tuple(Advice)
# MADV_* values by advice name.
MADV: dict[str, int] = {a.value: a.madv for a in Advice}
# The advice that changes vm_flags (mmap_lock for write; VMAs split and merge).
VM_FLAGS_ADVICE = frozenset(a.value for a in Advice if a.vm_flags)
# smaps VmFlags letters a madvise sets, and the advice that sets each: an imported or recorded
# mapping gets them back (VM_WIPEONFORK's wf is anon-only).
VMFLAG_ADVICE = {
    "sr": Advice.SEQUENTIAL,
    "rr": Advice.RANDOM,
    "dc": Advice.DONTFORK,
    "dd": Advice.DONTDUMP,
    "hg": Advice.HUGEPAGE,
    "nh": Advice.NOHUGEPAGE,
}


class FsKind(enum.StrEnum):
    """What the filesystem of a regular file does about THPs (``file create --fs``).

    ``ro-thp``: CONFIG_READ_ONLY_THP_FOR_FS, the 2019 design: the page cache holds small pages
    until khugepaged or MADV_COLLAPSE collapses a range of a file nobody has open for write.
    ``large-folio``: a filesystem with large folios and that option off (ext4 on 6.18): the
    page cache gets PMD-order folios from readahead into a VM_HUGEPAGE VMA and from large
    writes, and no collapse applies (file_thp_enabled() is false)."""

    RO_THP = "ro-thp"
    LARGE_FOLIO = "large-folio"


DEFAULT_FS = FsKind.RO_THP

# The smaps fields we print (kB), in the kernel's order (6.18 show_smap and __show_smap).
SMAPS_FIELDS = (
    "Size",
    "KernelPageSize",
    "MMUPageSize",
    "Rss",
    "Pss",
    "Pss_Dirty",
    "Shared_Clean",
    "Shared_Dirty",
    "Private_Clean",
    "Private_Dirty",
    "Referenced",
    "Anonymous",
    "KSM",
    "LazyFree",
    "AnonHugePages",
    "ShmemPmdMapped",
    "FilePmdMapped",
    "Shared_Hugetlb",
    "Private_Hugetlb",
    "Swap",
    "SwapPss",
    "Locked",
)

# /proc/PID/smaps_rollup's fields (kB): __show_smap with rollup, which adds Pss_Anon/File/Shmem.
SMAPS_ROLLUP_FIELDS = (
    "Rss",
    "Pss",
    "Pss_Dirty",
    "Pss_Anon",
    "Pss_File",
    "Pss_Shmem",
    *SMAPS_FIELDS[6:],
)
