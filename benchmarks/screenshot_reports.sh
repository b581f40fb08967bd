#!/usr/bin/env bash
# Renders each run's report.html in headless Chromium and saves a screenshot, after checking
# that every <img src> of the page is a file that decodes as a PNG (a broken image fails).
#
#   benchmarks/screenshot_reports.sh RUN_DIR [RUN_DIR ...]
#   OUT=/tmp/shots WIDTH=1000 HEIGHT=4000 benchmarks/screenshot_reports.sh runs/healthcare/r1
#
# Needs Chromium (Debian: apt-get install -y chromium). Not part of the test suite.
set -euo pipefail

OUT=${OUT:-/tmp/report_screenshots}
WIDTH=${WIDTH:-1000}
HEIGHT=${HEIGHT:-4000}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$HERE/.venv/bin/python}
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}

if [ $# -eq 0 ]; then
    echo "usage: $0 RUN_DIR [RUN_DIR ...]" >&2
    exit 2
fi
if [ -z "$CHROMIUM" ]; then
    echo "chromium not found (Debian: apt-get install -y chromium)" >&2
    exit 2
fi
mkdir -p "$OUT"

for run in "$@"; do
    page=$(cd "$run" && pwd)/report.html
    if [ ! -f "$page" ]; then
        echo "$run: no report.html" >&2
        exit 1
    fi
    "$PYTHON" - "$page" <<'EOF'
import re
import sys
from pathlib import Path

import matplotlib.image

page = Path(sys.argv[1])
sources = re.findall(r'<img src="([^"]+)"', page.read_text(encoding="utf-8"))
for source in sources:
    pixels = matplotlib.image.imread(page.parent / source)  # raises if missing or not an image
    if pixels[..., :3].std() == 0:
        sys.exit(f"{page}: {source} is a single colour")
print(f"{page}: {len(sources)} images, all decode as PNG")
EOF
    name=$(basename "$(dirname "$(dirname "$page")")")_$(basename "$(dirname "$page")")
    shot="$OUT/$name.png"
    "$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --allow-file-access-from-files \
        --window-size="$WIDTH,$HEIGHT" --screenshot="$shot" "file://$page" >/dev/null 2>&1
    [ -s "$shot" ] || { echo "$run: no screenshot written" >&2; exit 1; }
    echo "$shot"
done
