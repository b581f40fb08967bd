"""What a person sees in a run's report.html: the table first, real plots, the config last."""

from __future__ import annotations

import re
from pathlib import Path


def checked_report_page(run_dir: Path, first_method: str) -> tuple[str, list[str]]:
    """The page and its image sources, after checking every image is a real 800 px PNG and
    the order: result table (starting with `first_method`), plots, resolved config."""
    import matplotlib.image

    page = (run_dir / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    for source in sources:
        pixels = matplotlib.image.imread(run_dir / source)
        assert pixels.shape[1] == 800 and pixels[..., :3].std() > 0.05, source
    assert page.index(f"<td>{first_method}</td>") < page.index("<img") < page.index("<pre>[job]")
    return page, sources
