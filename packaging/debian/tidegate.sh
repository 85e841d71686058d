#!/bin/sh
# /usr/bin/tidegate: the system Python (it has BCC, python3-bpfcc) with
# tidegate and its pinned dependencies from /opt/tidegate/lib. -P: never the
# current directory on sys.path; -s: no user site-packages.
PYTHONPATH=/opt/tidegate/lib
PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH PYTHONDONTWRITEBYTECODE
exec /usr/bin/python3 -P -s -m tidegate.cli.entry "$@"
