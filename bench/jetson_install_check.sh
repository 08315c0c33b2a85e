#!/usr/bin/env bash
# Checks deploy_examples/jetson/install.sh with pip's resolver against JetPack-like installs: a throwaway
# venv gets fake torch/torchvision distributions (metadata only, versions as NVIDIA's Jetson wheels
# name them), then `pip install --dry-run --report` shows what a plain install and install.sh would
# install. Needs PyPI (package metadata). Output: bench/results/jetson_install_check.txt.
#   bash bench/jetson_install_check.sh > bench/results/jetson_install_check.txt
set -u
src=$(cd "$(dirname "$0")/.." && pwd)
fake() {  # VENV NAME VERSION: register an installed distribution (metadata only, as JetPack's wheel would be seen by pip)
  local sp; sp=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  local d="$sp/$2-$3.dist-info"; mkdir -p "$d"
  printf 'Metadata-Version: 2.1\nName: %s\nVersion: %s\n' "$2" "$3" > "$d/METADATA"
  printf 'pip\n' > "$d/INSTALLER"; printf '%s/METADATA,,\n' "$2-$3.dist-info" > "$d/RECORD"
}
planned() {  # REPORT.json: the packages pip would install, name==version
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(" ".join(sorted(i["metadata"]["name"]+"=="+i["metadata"]["version"] for i in r["install"])))' "$1"
}
scenario() {  # TITLE TORCH TORCHVISION(or -)
  local v=/tmp/jp-venv; rm -rf $v; python3 -m venv $v >/dev/null; $v/bin/pip install -q --upgrade pip >/dev/null 2>&1
  fake $v torch "$2"; [ "$3" != - ] && fake $v torchvision "$3"
  echo "### $1: installed torch $2, torchvision $3"
  echo "\$ pip install --dry-run $src   (plain install)"
  if $v/bin/pip install -q --dry-run --report /tmp/jp-plain.json "$src" >/tmp/jp-plain.log 2>&1; then
    echo "would install: $(planned /tmp/jp-plain.json | tr ' ' '\n' | grep -E '^(torch|torchvision)==' | tr '\n' ' ')(torch/torchvision lines only)"
  else echo "pip refused: $(grep -m1 -E 'ERROR' /tmp/jp-plain.log)"; fi
  echo "\$ PYTHON=$v/bin/python install.sh  (dry run: pip install --dry-run --constraint <pins>)"
  sed 's/-m pip install --constraint/-m pip install -q --dry-run --report \/tmp\/jp-c.json --constraint/; /import torch, torchvision; print/d' $src/deploy_examples/jetson/install.sh > /tmp/jp-install.sh
  PYTHON=$v/bin/python bash /tmp/jp-install.sh "$src" >/tmp/jp-c.log 2>&1; rc=$?
  grep -h "install.sh:" /tmp/jp-c.log
  if [ $rc -eq 0 ]; then echo "exit 0; would install: $(planned /tmp/jp-c.json | tr ' ' '\n' | grep -cE '^(torch|torchvision)==') torch/torchvision packages; all planned: $(planned /tmp/jp-c.json)";
  else echo "exit $rc: $(grep -m1 -E 'ERROR|Cannot install|conflict' /tmp/jp-c.log)"; fi
  echo
}
echo "pip $(python3 -m pip --version | cut -d' ' -f2); host $(uname -m) (the resolver's decisions, not aarch64 wheels)"
echo
scenario "JetPack 6.1-like" "2.5.0a0+872d972e41.nv24.8" "0.20.0a0+afc54f7"
scenario "JetPack-like, no torchvision yet" "2.5.0a0+872d972e41.nv24.8" -
scenario "JetPack 6.0-like (torch older than robustprune needs)" "2.3.0" "0.18.0a0+6043bc2"
