#!/usr/bin/env bash
# Usage: venv_is_stale.sh VENV. Exits 0 (and says why on stderr) when a console script in VENV/bin
# starts with a `#!` line naming an interpreter that is gone, 1 otherwise. pip writes that line
# from the path it was run by, so an environment cached outside a clone and installed through the
# clone's .venv link names a clone that a later run no longer has.
set -uo pipefail
for script in "$1"/bin/*; do
  [ -f "$script" ] || continue
  line=$(head -n 1 "$script" 2>/dev/null | tr -d '\0')
  case "$line" in
    '#!/'*)
      interpreter=${line#\#!}
      interpreter=${interpreter%% *}
      if [ ! -x "$interpreter" ]; then
        echo "setup: $script names $interpreter, which is gone" >&2
        exit 0
      fi
      ;;
  esac
done
exit 1
