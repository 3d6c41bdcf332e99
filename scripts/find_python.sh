#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter, or explain what to install and exit 1.
# Order: a working python3.13 / python3.12 on PATH, then pyenv's versions folder (oldest >= 3.12 first: 3.12 is the checked stack).
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
for name in python3.13 python3.12 python3; do
  path=$(command -v "$name" 2>/dev/null) || continue
  if ok "$path"; then echo "$path"; exit 0; fi
done
root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for path in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do
  if ok "$path"; then echo "$path"; exit 0; fi
done
echo "error: seqppl needs Python >= 3.12 (ArviZ 1.x) and none was found on PATH or in pyenv." >&2
echo "       Install one, e.g. 'pyenv install 3.12' or your system's python3.12 package." >&2
exit 1
