#!/usr/bin/env bash
# Installs every system package that building and testing Attaché needs, on
# Debian or Ubuntu (as root, or through sudo). The README's set-up and
# .ci/run both call this script, so the two cannot drift apart.
#
#   clang, libclang-dev   RocksDB's bindgen (rocksdb crate) needs libclang
#   protobuf-compiler     etcd-client's build script runs `protoc` from PATH
#   libprotobuf-dev       ... and imports google/protobuf/*.proto, which only
#                         this package ships (a recommends of protobuf-compiler,
#                         so --no-install-recommends leaves it out)
#                         (our own protos use the vendored protoc)
#   etcd-server           the etcd conformance and benchmark tests start their
#                         own etcd on free loopback ports
#   ca-certificates       cargo's HTTPS to the crate registry
#   util-linux, mount,    block volumes: losetup, blkid and umount for the
#   e2fsprogs             loop-device test, mkfs.ext4 for --format-new-volumes
#   python3, python3-venv moto, the EC2 API emulator the AWS provider's test
#                         starts: from PyPI into its own venv under
#                         /opt/attache-moto, linked onto PATH as moto_server
#
# Rust itself (rustup, cargo) is not installed here: see the README.
set -euo pipefail
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
packages=(clang libclang-dev protobuf-compiler libprotobuf-dev etcd-server ca-certificates util-linux mount e2fsprogs
    python3 python3-venv)
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
if [ ! -f /usr/include/google/protobuf/descriptor.proto ]; then
    echo "install-deps: google/protobuf/descriptor.proto is missing (libprotobuf-dev)" >&2
    exit 1
fi
moto_dir=/opt/attache-moto
moto_version=5.2.1
if ! "$moto_dir/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$moto_version')" 2>/dev/null; then
    $sudo /usr/bin/python3 -m venv "$moto_dir"
    $sudo "$moto_dir/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$moto_version"
fi
$sudo ln -sf "$moto_dir/bin/moto_server" /usr/local/bin/moto_server
for tool in clang protoc etcd moto_server; do
    if ! command -v "$tool" >/dev/null; then
        echo "install-deps: $tool is still not on PATH after installing ${packages[*]}" >&2
        exit 1
    fi
done
echo "install-deps: installed ${packages[*]} and moto $moto_version"
