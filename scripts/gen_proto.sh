#!/usr/bin/env bash
# Generate Python gRPC code from proto/tidegate/v1/*.proto into
# control/tidegate/v1/ (gitignored: generated at set-up, never committed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${1:-${root}/.venv/bin/python}"
shopt -s nullglob
protos=("${root}"/proto/tidegate/v1/*.proto)
if [ ${#protos[@]} -eq 0 ]; then
    echo "gen_proto: no .proto files yet, nothing to generate"
    exit 0
fi
mkdir -p "${root}/control/tidegate/v1"
"${py}" -m grpc_tools.protoc -I "${root}/proto" \
    --python_out="${root}/control" --grpc_python_out="${root}/control" --pyi_out="${root}/control" \
    "${protos[@]}"
touch "${root}/control/tidegate/v1/__init__.py"
echo "gen_proto: generated ${#protos[@]} file(s) into control/tidegate/v1/"
