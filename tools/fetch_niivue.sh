#!/usr/bin/env bash
# Fetch the niivue viewer that `phanes report` inlines in its per-volume pages, from the npm registry.
# Writes phanes_cli/cohort_report/niivue.umd.js (the package's own prebuilt UMD bundle, dist/niivue.umd.js,
# unchanged) and checks it against the sha256 recorded below. Licence: BSD-2-Clause (phanes_cli/data/NOTICE).
# Usage: tools/fetch_niivue.sh   (needs npm and the network; run it to update, then update VERSION and SHA256)
set -euo pipefail
VERSION=0.69.0
SHA256=47b896b77ec4a5be3ef1949c33ad393b6f45629921f326c279000bcf51bdb4af
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@niivue/niivue@${VERSION}" >/dev/null && tar xzf niivue-niivue-"${VERSION}".tgz)
echo "${SHA256}  $work/package/dist/niivue.umd.js" | sha256sum --check --quiet
cp "$work/package/dist/niivue.umd.js" "$here/phanes_cli/cohort_report/niivue.umd.js"
echo "niivue ${VERSION} -> phanes_cli/cohort_report/niivue.umd.js"
