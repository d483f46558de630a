"""What the remapper knows of the collapser's files, and which VMAs map each of them.

The collapser owns files; it tells the remapper about each one (``FileInfo``: name, size, shmem)
so that mmap can name them and smaps can print them. The file rmap (``i_mmap``, in the kernel
the interval tree in ``struct address_space``) is the remapper's: it is how retract_page_tables,
unmap_mapping_range and uprobes find every mapping of a file.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from remapd.mm import Mm, Vma
from shared.errors import UserError
from shared.protocol import messages as m
from shared.vm import DEFAULT_FS, FsKind


class FileMirror:
    """One file as the collapser's FileInfo notices describe it; ``(ino, gen)`` is its identity."""

    __slots__ = ("fs", "gen", "ino", "name", "shmem", "size")

    def __init__(self, ino: int, name: str, size: int, shmem: bool, gen: int = 0, fs: FsKind = DEFAULT_FS):
        self.ino = ino
        self.name = name
        self.size = size
        self.shmem = shmem
        self.gen = gen
        self.fs = fs

    @property
    def large_folio(self) -> bool:
        """A regular file on a large-folio filesystem (not shmem)."""
        return not self.shmem and self.fs == FsKind.LARGE_FOLIO


class Files(Mapping[int, FileMirror]):
    """Every known file by inode number (the mapping itself) and by name, and the file rmap."""

    def __init__(self) -> None:
        self._by_ino: dict[int, FileMirror] = {}
        self.by_name: dict[str, FileMirror] = {}
        self.shmem_inos: set[int] = set()  # the shmem files' inode numbers, for the fault path
        # ino -> {id(vma): (mm, vma)}: insertion-ordered, so walks visit mappings oldest first.
        self.i_mmap: dict[int, dict[int, tuple[Mm, Vma]]] = {}
        self.opens = 0  # struct files made by open(2): the last identity handed out

    def open_file(self) -> int:
        """A new struct file's identity (what a VMA's vm_file points at)."""
        self.opens += 1
        return self.opens

    def __getitem__(self, ino: int) -> FileMirror:
        return self._by_ino[ino]

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_ino)

    def __len__(self) -> int:
        return len(self._by_ino)

    def file_info(self, msg: m.FileInfo) -> None:
        """A file was created, renamed or changed size on the collapser.

        A notice about another identity on a number we mirror is ignored: the collapser
        restarted and gave the number to a new file before it heard our claim (our resync
        named the file we mirror, ahead of anything else we send); once it has, it moves its
        own file to a fresh number and tells us again."""
        f = self._by_ino.get(msg.ino)
        if f is None:
            f = self._by_ino[msg.ino] = FileMirror(msg.ino, msg.name, msg.size, msg.shmem, msg.gen, msg.fs)
            self.by_name[msg.name] = f
            if msg.shmem:
                self.shmem_inos.add(msg.ino)
        elif f.gen != msg.gen:
            return
        elif f.name != msg.name:
            if self.by_name.get(f.name) is f:
                del self.by_name[f.name]
            f.name = msg.name
            self.by_name[msg.name] = f
        f.size = msg.size

    def lookup(self, name: str) -> FileMirror:
        """The file called ``name``, or ENOENT."""
        f = self.by_name.get(name)
        if f is None:
            raise UserError("ENOENT", f"no file {name!r}")
        return f

    def is_shmem(self, ino: int) -> bool:
        f = self._by_ino.get(ino)
        return f is not None and f.shmem

    def i_mmap_insert(self, mm: Mm, vma: Vma) -> None:
        self.i_mmap.setdefault(vma.ino, {})[id(vma)] = (mm, vma)

    def i_mmap_remove(self, vma: Vma) -> None:
        del self.i_mmap[vma.ino][id(vma)]

    def mappings(self, ino: int) -> list[tuple[Mm, Vma]]:
        """Every (mm, VMA) mapping the file (vma_interval_tree_foreach), as a list the caller may
        keep walking while it links and unlinks VMAs."""
        return list(self.i_mmap.get(ino, {}).values())

    def open_for_write(self, ino: int) -> bool:
        """inode_is_open_for_write: a shared writable mapping holds i_writecount."""
        return any(vma.writes_file for _, vma in self.i_mmap.get(ino, {}).values())
