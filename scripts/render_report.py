"""Render a streamlens HTML report in headless Chromium, offline, and check that it really drew.

    python scripts/render_report.py out/report.html --png out/report.png

Two checks, both with the network off (``--disable-background-networking``, no other URLs than the file):

1. ``--dump-dom`` after the page's scripts ran: every plotly figure div must contain the SVG that
   plotly.js draws (``main-svg``), so the embedded plotly.js loaded and ran without the internet.
2. ``--screenshot``: the PNG is decoded (pure Python, no Pillow) and must not be blank: enough
   non-white pixels, several distinct colours, content reaching down the page.

Prints one line per check and exits 1 if any fails (2 if Chromium is not installed).
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000"]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _run(exe: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                              timeout=timeout)


def read_png(path: Path) -> tuple[int, int, int, bytes]:
    """``(width, height, channels, pixels)`` of an 8-bit, non-interlaced RGB/RGBA PNG."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    i, idat, w = 8, b"", 0
    while i < len(data):
        n, kind = struct.unpack(">I4s", data[i : i + 8])
        body = data[i + 8 : i + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or ctype not in (2, 6) or interlace:
                raise ValueError(f"unsupported PNG (depth {depth}, colour type {ctype}, interlace {interlace})")
            ch = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        i += 12 + n
    raw = zlib.decompress(idat)
    stride = w * ch
    out = bytearray(stride * h)
    prev = bytearray(stride)
    for y in range(h):  # undo the per-row PNG filters
        f, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            a = row[x - ch] if x >= ch else 0
            b, c = prev[x], (prev[x - ch] if x >= ch else 0)
            if f == 1:
                row[x] = (row[x] + a) & 255
            elif f == 2:
                row[x] = (row[x] + b) & 255
            elif f == 3:
                row[x] = (row[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[x] = (row[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out[y * stride : (y + 1) * stride] = row
        prev = row
    return w, h, ch, bytes(out)


def png_stats(path: Path, step: int = 4) -> dict:
    """Fraction of non-white pixels, distinct colours, and the lowest row with content (sampled)."""
    w, h, ch, px = read_png(path)
    nonwhite, colours, last = 0, set(), 0
    total = 0
    for y in range(0, h, step):
        for x in range(0, w, step):
            o = (y * w + x) * ch
            rgb = px[o : o + 3]
            total += 1
            colours.add(rgb)
            if min(rgb) < 235:
                nonwhite += 1
                last = y
    return {"width": w, "height": h, "nonwhite": nonwhite / max(total, 1), "colours": len(colours),
            "last_row": last}


def check(html: Path, png: Path, *, width: int = 1400, height: int = 3000, timeout: float = 120) -> list[str]:
    """Render ``html``; return the failures (empty when the report drew)."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed")
    url = html.resolve().as_uri()
    problems = []
    source = html.read_text(encoding="utf-8")
    if re.search(r"<script[^>]+src=[\"']https?:", source):
        problems.append("the report loads a script from the network")
    n_figures = source.count('class="plotly-graph-div"')
    dom = _run(exe, ["--dump-dom", url], timeout).stdout
    # the text from each figure's div to the next one must hold the SVG plotly.js draws
    parts = dom.split('class="plotly-graph-div')[1:]
    drawn = sum('class="main-svg"' in part for part in parts)
    print(f"figures: {n_figures} in the HTML, {drawn} drawn by plotly.js")
    if n_figures == 0 or drawn < n_figures:
        problems.append(f"{n_figures} figures in the report but plotly drew {drawn}")
    png.parent.mkdir(parents=True, exist_ok=True)
    _run(exe, [f"--window-size={width},{height}", f"--screenshot={png}", url], timeout)
    if not png.exists():
        problems.append("chromium wrote no screenshot")
        return problems
    st = png_stats(png)
    print(f"screenshot {png}: {st['width']}x{st['height']}, {st['nonwhite']:.1%} non-white, "
          f"{st['colours']} colours, content down to row {st['last_row']}")
    if st["nonwhite"] < 0.01 or st["colours"] < 20:
        problems.append(f"the screenshot looks blank ({st['nonwhite']:.1%} non-white, {st['colours']} colours)")
    if st["last_row"] < st["height"] // 3:
        problems.append(f"content stops at row {st['last_row']} of {st['height']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("--png", type=Path, help="screenshot path (default: next to the report)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=3000)
    args = ap.parse_args(argv)
    if not args.html.exists():
        print(f"render_report: error: {args.html} does not exist", file=sys.stderr)
        return 1
    try:
        problems = check(args.html, args.png or args.html.with_suffix(".png"), width=args.width, height=args.height)
    except FileNotFoundError as e:
        print(f"render_report: error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"FAILED: {p}")
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
