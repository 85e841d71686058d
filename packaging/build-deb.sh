#!/usr/bin/env bash
# make deb: build dist/tidegate_<version>_<arch>.deb with dpkg-deb.
# Layout: /opt/tidegate/lib (tidegate with its generated gRPC code, and its
# runtime dependencies pinned to the versions of the development venv; no
# test extras, no grpcio-tools), /opt/tidegate/bpf (the program's source,
# compiled by BCC at agent start), /opt/tidegate/examples, /usr/bin/tidegate
# (the system python3, which has BCC), the template unit, /etc/tidegate
# conffiles, completion, the man page and the JSON Schema.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PY:-${root}/.venv/bin/python}"
out="${1:-${root}/dist}"
version="$(PYTHONPATH="${root}/control" "${py}" -c 'import tidegate; print(tidegate.__version__)')"
arch="$(dpkg --print-architecture)"
deb="${out}/tidegate_${version}_${arch}.deb"
work="$(mktemp -d /var/tmp/tidegate-deb.XXXXXX)"
trap 'rm -rf "${work}"' EXIT
stage="${work}/stage"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "${root}" log -1 --format=%ct 2>/dev/null || date +%s)}"

[ -f "${root}/control/tidegate/v1/tidegate_pb2.py" ] || bash "${root}/scripts/gen_proto.sh" "${py}"

# runtime dependencies from pyproject.toml, pinned (with what they pull in) to the venv's versions
"${py}" - "${root}/pyproject.toml" >"${work}/requirements.txt" <<'PY'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.startswith("grpcio-tools")))
PY
"${py}" -m pip freeze --exclude-editable 2>/dev/null | grep -v '^tidegate' >"${work}/constraints.txt"
lib="${stage}/opt/tidegate/lib"
"${py}" -m pip install -q --disable-pip-version-check --no-compile --target "${lib}" \
    -r "${work}/requirements.txt" -c "${work}/constraints.txt"
"${py}" -m pip install -q --disable-pip-version-check --no-compile --no-deps --target "${lib}" "${root}"
rm -rf "${lib:?}/bin" "${root:?}/build"
find "${lib}" -name '__pycache__' -prune -exec rm -rf {} +
find "${lib}" -name '*.pyi' -delete
find "${lib}" -type d -name tests -path '*/numpy/*' -prune -exec rm -rf {} +
# no strip: auditwheel-repaired libraries (numpy's OpenBLAS) stop loading when stripped
find "${lib}" -type d -exec chmod 0755 {} + && find "${lib}" -type f -exec chmod 0644 {} +
"${py}" -m compileall -q -j 0 --invalidation-mode unchecked-hash "${lib}" >/dev/null

install -d "${stage}/opt/tidegate/bpf" "${stage}/opt/tidegate/examples"
install -m 0644 "${root}"/bpf/*.[ch] "${stage}/opt/tidegate/bpf/"
install -m 0644 "${root}"/examples/*.yaml "${stage}/opt/tidegate/examples/"
install -D -m 0755 "${root}/packaging/debian/tidegate.sh" "${stage}/usr/bin/tidegate"
install -D -m 0644 "${root}/deploy/tidegate-agent@.service" "${stage}/lib/systemd/system/tidegate-agent@.service"
install -D -m 0644 "${root}/examples/edge-default.yaml" "${stage}/etc/tidegate/rules.yaml"
install -D -m 0644 "${root}/deploy/example.env" "${stage}/etc/tidegate/example.env"
install -D -m 0644 "${root}/deploy/tidegate-rules.schema.json" "${stage}/usr/share/tidegate/rules.schema.json"
run() { PYTHONPATH="${lib}" PYTHONDONTWRITEBYTECODE=1 /usr/bin/python3 -P -s "$@"; }
install -d "${stage}/usr/share/bash-completion/completions" "${stage}/usr/share/zsh/vendor-completions" \
    "${stage}/usr/share/man/man1" "${stage}/usr/share/doc/tidegate"
run -m tidegate.cli.main completion bash >"${stage}/usr/share/bash-completion/completions/tidegate"
run -m tidegate.cli.main completion zsh >"${stage}/usr/share/zsh/vendor-completions/_tidegate"
run "${root}/packaging/manpage.py" | gzip -9n >"${stage}/usr/share/man/man1/tidegate.1.gz"
install -m 0644 "${root}/packaging/debian/copyright" "${stage}/usr/share/doc/tidegate/copyright"
install -m 0644 "${root}/README.md" "${stage}/usr/share/doc/tidegate/README.md"
install -D -m 0644 "${root}/packaging/debian/lintian-overrides" "${stage}/usr/share/lintian/overrides/tidegate"
printf 'tidegate (%s) unstable; urgency=medium\n\n  * Release %s.\n\n -- tidegate maintainers <tidegate@tidegate.dev>  %s\n' \
    "${version}" "${version}" "$(date -u -R -d "@${SOURCE_DATE_EPOCH}")" | gzip -9n >"${stage}/usr/share/doc/tidegate/changelog.gz"

install -d "${stage}/DEBIAN"
size="$(du -sk --exclude=DEBIAN "${stage}" | cut -f1)"
sed -e "s/@VERSION@/${version}/" -e "s/@ARCH@/${arch}/g" -e "s/@SIZE@/${size}/" \
    "${root}/packaging/debian/control.in" >"${stage}/DEBIAN/control"
printf '/etc/tidegate/rules.yaml\n/etc/tidegate/example.env\n' >"${stage}/DEBIAN/conffiles"
for s in postinst prerm postrm; do install -m 0755 "${root}/packaging/debian/${s}" "${stage}/DEBIAN/${s}"; done
(cd "${stage}" && find . -path ./DEBIAN -prune -o -type f -print0 | sort -z | xargs -0 md5sum | sed 's| \./| |') \
    >"${stage}/DEBIAN/md5sums"
find "${stage}" -exec touch -h -d "@${SOURCE_DATE_EPOCH}" {} +
mkdir -p "${out}"
dpkg-deb --root-owner-group -Zxz --build "${stage}" "${deb}" >/dev/null
echo "${deb}"
