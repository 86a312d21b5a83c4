#!/bin/bash
# The Debian package (packaging/debian/, see packaging/README.md).
#
#   scripts/build-deb.sh [OUTPUT_DIR]   build it with dpkg-buildpackage in OUTPUT_DIR (default build/deb): a copy of
#                                       the source tree in OUTPUT_DIR/fleetprov-VERSION, the .deb, .buildinfo and
#                                       .changes next to it. Nothing is written to the checkout.
#   scripts/build-deb.sh --lock         rewrite packaging/debian/requirements.txt: the bundled Python packages
#                                       (pyproject.toml's dependencies and the pkcs11 extra, as PyPI resolves them
#                                       today for CPython 3.11), pinned, with the hashes of their amd64 and arm64
#                                       wheels. Review the diff, then build and test (make test).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's own tools and interpreter, whatever venv or pyenv the caller has on its PATH.
clean_env=(env -u VIRTUAL_ENV -u PYTHONPATH -u PYTHONHOME -u PYTHONSTARTUP -u PYTHONUSERBASE
    PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8)

lock() {
    local requirements=packaging/debian/requirements.txt platforms version
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # The requirements of the device package: the project's dependencies and its pkcs11 extra, nothing else.
    "${clean_env[@]}" python3.11 - pyproject.toml >"$work/wanted.txt" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as file:
    project = tomllib.load(file)["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["pkcs11"]))
EOF
    for arch in x86_64 aarch64; do
        # Every manylinux wheel that runs on Debian 12's glibc 2.36 (this pip does not infer the older ones).
        platforms=(--platform "manylinux2014_$arch")
        for version in $(seq 17 36); do platforms+=(--platform "manylinux_2_${version}_$arch"); done
        "${clean_env[@]}" python3.11 -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
            "${platforms[@]}" --python-version 3.11 --implementation cp --abi cp311 \
            --dest "$work/$arch" ${pins:+--constraint "$work/pins.txt"} -r "$work/wanted.txt"
        # The x86_64 resolution pins the versions; aarch64 must resolve to the same ones.
        [ -n "${pins:-}" ] || { ls "$work/$arch" | sed -E 's/^([^-]+)-([^-]+)-.*/\1==\2/' >"$work/pins.txt"; pins=1; }
    done
    "${clean_env[@]}" python3.11 - "$work" >"$requirements" <<'EOF'
import collections, hashlib, pathlib, re, sys
work = pathlib.Path(sys.argv[1])
hashes = collections.defaultdict(set)
for wheel in sorted(work.glob("*/*.whl")):
    name, version = wheel.name.split("-")[:2]
    name = re.sub(r"[-_.]+", "-", name).lower()
    hashes[f"{name}=={version}"].add(hashlib.sha256(wheel.read_bytes()).hexdigest())
print("# The Python packages bundled in the Debian package, with the sha256 of their amd64 and arm64 wheels for")
print("# CPython 3.11. Written by `scripts/build-deb.sh --lock`; debian/rules installs exactly these.")
for pin in sorted(hashes):
    print(pin + "".join(f" \\\n    --hash=sha256:{digest}" for digest in sorted(hashes[pin])))
EOF
    echo "wrote $requirements:"
    grep -E '^[a-z]' "$requirements" | sed 's/ \\$//'
}

build() {
    local out=${1:-build/deb} version
    version=$("${clean_env[@]}" dpkg-parsechangelog -l packaging/debian/changelog -SVersion)
    if [ -e "$out" ] && [ ! -e "$out/.fleetprov-deb" ] && [ -n "$(ls -A "$out")" ]; then
        echo "$out exists and was not made by $0: give an empty or new directory" >&2
        exit 64
    fi
    rm -rf "$out"
    mkdir -p "$out"
    touch "$out/.fleetprov-deb"
    local src="$out/fleetprov-$version"
    mkdir "$src"
    # What the package is built from; debian/rules leaves the emulator out of the device's wheel.
    tar -c --exclude=__pycache__ --exclude='*.pyc' \
        pyproject.toml README.md fleetprov systemd configs/config.example.yaml | tar -x -C "$src"
    cp -r packaging/debian "$src/debian"
    (cd "$src" && "${clean_env[@]}" dpkg-buildpackage --build=binary --no-sign)
    ls -l "$out"/*.deb
}

case "${1:-}" in
    --lock) lock ;;
    -*) echo "usage: $0 [OUTPUT_DIR] | --lock" >&2; exit 64 ;;
    *) build "$@" ;;
esac
