"""Execute each cookbook notebook and write a rendered Markdown copy with its images under cookbook/rendered/.

    python cookbook/render.py                      # every notebook, one at a time
    python cookbook/render.py 01_quickstart 04     # those whose names start with these

The notebooks themselves stay without outputs (tests/test_cookbook.py checks it); what a run shows is in
rendered/NAME.md and rendered/NAME_files/*.png, produced only by this command. Each render ends with the wall time
it took and the machine it ran on.
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
RENDERED = HERE / "rendered"


def notebooks(prefixes: list[str] | None = None) -> list[Path]:
    """The cookbook notebooks in order, or those whose names start with one of ``prefixes``."""
    found = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    return [p for p in found if not prefixes or any(p.stem.startswith(x) for x in prefixes)]


def execute(path: Path, *, timeout: int = 900) -> tuple[nbformat.NotebookNode, float]:
    """Run ``path`` top to bottom in a fresh kernel (working directory: the cookbook); raises on the first error."""
    book = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(book, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    return book, time.perf_counter() - t0


def portable(text: str) -> str:
    """``text`` with this machine's folders written as a reader's: the repository's as paths relative to it, the
    temporary folder as ``$TMPDIR`` (a rendered page names no machine's paths)."""
    text = text.replace(str(HERE.parent) + os.sep, "")
    return text.replace(str(Path(tempfile.gettempdir()).resolve()) + os.sep, "$TMPDIR/")


def _fence(text: str, lang: str = "") -> str:
    return f"```{lang}\n{text.rstrip()}\n```\n"


def to_markdown(book: nbformat.NotebookNode, name: str, files: Path) -> str:
    """Markdown of an executed notebook: markdown cells as they are, code in fences, text outputs in fences (with
    `portable` paths), images written to ``files`` and linked."""
    parts: list[str] = []
    n_image = 0
    for cell in book.cells:
        if cell.cell_type == "markdown":
            parts.append(cell.source.rstrip() + "\n")
            continue
        if cell.cell_type != "code":
            continue
        parts.append(_fence(cell.source, "python"))
        texts: list[str] = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
                continue
            data = out.get("data", {})
            if "image/png" in data:
                if texts:
                    parts.append(_fence(portable("".join(texts))))
                    texts = []
                n_image += 1
                files.mkdir(parents=True, exist_ok=True)
                image = files / f"{name}_{n_image}.png"
                image.write_bytes(base64.b64decode(data["image/png"]))
                parts.append(f"![{name}, figure {n_image}]({files.name}/{image.name})\n")
            elif "text/plain" in data:
                texts.append(data["text/plain"] + "\n")
            elif out.output_type == "error":
                texts.append("\n".join(out.get("traceback", [])))
        if texts:
            parts.append(_fence(portable("".join(texts))))
    return "\n".join(parts)


def render(path: Path) -> float:
    book, seconds = execute(path)
    files = RENDERED / f"{path.stem}_files"
    shutil.rmtree(files, ignore_errors=True)
    body = to_markdown(book, path.stem, files)
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    note = (f"<!-- rendered by `python cookbook/render.py` from {path.name}; do not edit -->\n\n")
    footer = f"\n---\n*Rendered by `python cookbook/render.py`: ran in {seconds:.0f} s on {machine}.*\n"
    RENDERED.mkdir(exist_ok=True)
    (RENDERED / f"{path.stem}.md").write_text(note + body + footer)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook name prefixes (default: all)")
    args = parser.parse_args(argv)
    chosen = notebooks(args.names)
    if not chosen:
        parser.error(f"no notebook matches {args.names}")
    for path in chosen:
        seconds = render(path)
        print(f"{path.stem}: {seconds:.0f} s -> {(RENDERED / (path.stem + '.md')).relative_to(HERE.parent)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
