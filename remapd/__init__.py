"""The remapper actor: processes, VMAs, page tables, mmap locks, faults, retraction, PMD installs."""
