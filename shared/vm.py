"""The names of the user-visible VM interface both actors and the client share: mmap protections,
madvise advice, and the /proc/PID/smaps fields we print."""

from __future__ import annotations

PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4

# mmap's protections by their thpctl names.
PROTS = {"r": PROT_READ, "rw": PROT_READ | PROT_WRITE, "rx": PROT_READ | PROT_EXEC, "rwx": PROT_READ | PROT_WRITE | PROT_EXEC}

# The madvise advice the model implements (MADV_* without the prefix, lower case).
ADVICE = (
    "hugepage",
    "nohugepage",
    "collapse",
    "dontneed",
    "populate_read",
    "populate_write",
    "pageout",
)

# The smaps fields we print, in the kernel's order (kB unless said otherwise).
SMAPS_FIELDS = (
    "Size",
    "KernelPageSize",
    "MMUPageSize",
    "Rss",
    "Anonymous",
    "AnonHugePages",
    "ShmemPmdMapped",
    "FilePmdMapped",
    "Shared_Hugetlb",
    "Private_Hugetlb",
    "Swap",
    "Locked",
)
