"""The collapser actor: the page cache (files, pages, refcounts) and khugepaged's first half."""
