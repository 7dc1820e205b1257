#!/bin/sh
# The container image's entrypoint (deploy/Containerfile), run under tini:
#   (nothing), serve, rebuild, keys, worker, -OPTION...  numerusd with these arguments (nothing: it serves)
#   demo                                                 the demo (scripts/demo.sh): the scripted agent runs a
#                                                        planned job on a fresh repository in a temporary state
#                                                        directory; nothing is downloaded
#   anything else                                        that command (numerusctl status, bash...)
set -eu
case "${1-serve}" in
  demo) shift; exec env BIN=/opt/numerus/bin bash /opt/numerus/share/demo.sh "$@" ;;
  serve | rebuild | keys | worker | -*) exec numerusd "$@" ;;
  *) exec "$@" ;;
esac
