#!/usr/bin/env bash
# The README's session, end to end (tests/test_readme_session.py runs it against real daemons and
# checks that the README shows exactly the lines below the marker).
set -euo pipefail
# --- session ---
thpctl sysfs set khugepaged/scan_sleep_millisecs 100
thpctl file create libfoo.so --size 4M
thpctl proc spawn 1
A=$(thpctl mmap 1 auto 4M --file libfoo.so --prot rx --private)
thpctl madvise 1 $A 4M hugepage
thpctl touch 1 $A 4M
thpctl wait-scans 2
thpctl smaps 1 | grep -E 'Rss|Pss|FilePmdMapped'
thpctl thpmaps 1 --rollup
thpctl map 1
thpctl pagemap 1 $A 8K
thpctl vmstat | grep thp_
thpctl status
