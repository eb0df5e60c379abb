"""Self-contained HTML pages: headings, tables, figures and thumbnail galleries in one file.

A :class:`Page` collects blocks and renders them as one HTML5 document with its CSS inline and
every image embedded as a ``data:`` URI, so the file opens anywhere: no network, no server, no
script, no external font. The model report (``featx report``) and the data audit build on it.

This module imports neither torch nor scikit-learn; matplotlib is imported only when a figure is
embedded.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import numbers
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence

from featx import __version__
from featx.exceptions import FeatxError
from featx.images import load_image
from featx.paths import atomic_write

__all__ = ["Page", "Raw", "escape", "figure_uri", "format_value", "thumbnail_uri"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 1.5rem auto; max-width: 72rem; padding: 0 1rem; color: #1d1d1f; background: #fff;
       line-height: 1.4; }
h1 { font-size: 1.6rem; margin: 0 0 1rem; }
h2 { font-size: 1.3rem; margin: 1.8rem 0 .6rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
h3 { font-size: 1.1rem; margin: 1.4rem 0 .5rem; }
h4, h5, h6 { font-size: 1rem; margin: 1rem 0 .4rem; }
p { margin: .4rem 0 .8rem; }
table { border-collapse: collapse; margin: .4rem 0 1rem; font-size: .9rem; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3rem; }
th, td { border: 1px solid #d0d0d0; padding: .25rem .6rem; vertical-align: top; }
th { background: #f2f2f2; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
figure.plot { margin: .4rem 0 1.2rem; }
figure.plot img { max-width: 100%; height: auto; }
figure.plot figcaption { font-size: .85rem; color: #555; }
.gallery { display: flex; flex-wrap: wrap; gap: .6rem; margin: .4rem 0 1.2rem; }
.gallery figure { margin: 0; text-align: center; font-size: .75rem; color: #333; }
.gallery img { object-fit: contain; background: #eee; border: 1px solid #ccc; display: block;
               margin: 0 auto .2rem; }
.gallery figcaption { overflow-wrap: anywhere; }
footer { margin-top: 2rem; font-size: .8rem; color: #777; }
"""


class Raw(str):
    """A string of HTML that :class:`Page` inserts as it is, not escaped.

    Use it for a table cell that is itself markup (a thumbnail, a link). Text from data, file
    names and labels must never be wrapped in it.

    Examples
    --------
    >>> Page("t").table([{"cell": Raw("<b>bold</b>")}]).render().count("<b>bold</b>")
    1
    """

    __slots__ = ()


def escape(text) -> str:
    """Return ``str(text)`` with ``& < > " '`` escaped for HTML text and attribute values.

    Examples
    --------
    >>> escape('<cat & "dog">')
    '&lt;cat &amp; &quot;dog&quot;&gt;'
    """
    return html.escape(str(text), quote=True)


def format_value(value) -> str:
    """The text a table shows for one value: numbers compact, missing values as an empty cell.

    Integers are written in full; floats with 4 significant digits (as a whole number from
    1000 up); ``None`` and NaN as ``""``; everything else as ``str(value)``. numpy scalars count
    as numbers.

    Examples
    --------
    >>> [format_value(v) for v in (3, 0.912345, 12.5, 1234.56, 1e-5, None, float("nan"), "a")]
    ['3', '0.9123', '12.5', '1235', '1e-05', '', '', 'a']
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return ""
        if math.isinf(value) or abs(value) < 1000:
            return f"{value:.4g}"
        return f"{value:.0f}"
    return str(value)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _text_html(text) -> str:
    """Escaped text with its line breaks kept (``<br>``); a :class:`Raw` string as it is."""
    if isinstance(text, Raw):
        return str(text)
    return "<br>".join(escape(line) for line in str(text).split("\n"))


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_uri(image, size: int = 96, *, quality: int = 85) -> str:
    """A ``data:image/jpeg;base64,…`` URI of `image` shrunk to fit in ``size × size`` pixels.

    The image is decoded like every featx image (:func:`featx.images.load_image`: EXIF
    orientation applied, grey, palette and transparent images made RGB on white). Its aspect
    ratio is kept; an image already smaller than `size` keeps its size (a page shows it larger
    with CSS).

    Parameters
    ----------
    image : str, os.PathLike, PIL.Image.Image or ndarray
        A file, a PIL image, or an array ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` (uint8, or
        floats in [0, 1]).
    size : int, default=96
        The longest side of the thumbnail, in pixels.
    quality : int, default=85
        JPEG quality.

    Returns
    -------
    str
        The URI, ready for an ``<img src=…>``.

    Raises
    ------
    ImageDecodeError
        If the image cannot be decoded (the message names it and says why).
    FeatxError
        If `size` is not a positive integer.

    Examples
    --------
    >>> import numpy as np
    >>> uri = thumbnail_uri(np.zeros((300, 200, 3), np.uint8), size=48)
    >>> uri.startswith("data:image/jpeg;base64,")
    True
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise FeatxError(f"thumbnail size must be a positive number of pixels, got {size!r}; pass e.g. size=96")
    from PIL import Image  # Pillow is imported by featx.images already

    size = int(size)
    picture = load_image(image, draft_size=(size, size))
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return _data_uri("image/jpeg", buffer.getvalue())


def figure_uri(fig_or_png, *, dpi: int = 100) -> str:
    """A ``data:image/png;base64,…`` URI of a matplotlib Figure or of PNG bytes.

    A Figure is drawn with the Agg backend (no display needed) and then closed: removed from
    pyplot's figure manager if pyplot made it, so a report in a loop does not keep figures
    alive.

    Parameters
    ----------
    fig_or_png : matplotlib.figure.Figure, bytes or path of a PNG file
        What to embed.
    dpi : int, default=100
        Resolution a Figure is drawn at.

    Returns
    -------
    str

    Raises
    ------
    FeatxError
        If the bytes or the file are not a PNG image, or the object is none of the above.

    Examples
    --------
    >>> from matplotlib.figure import Figure
    >>> fig = Figure(figsize=(2, 1))
    >>> _ = fig.add_subplot().plot([0, 1], [1, 0])
    >>> figure_uri(fig).startswith("data:image/png;base64,iVBOR")
    True
    """
    if isinstance(fig_or_png, (bytes, bytearray, memoryview)):
        data = bytes(fig_or_png)
        what = "the bytes given"
    elif isinstance(fig_or_png, (str, os.PathLike)):
        with open(fig_or_png, "rb") as handle:
            data = handle.read()
        what = f"'{os.fsdecode(fig_or_png)}'"
    elif hasattr(fig_or_png, "savefig") and hasattr(fig_or_png, "canvas"):
        data = _figure_png(fig_or_png, dpi=dpi)
        what = "the figure"
    else:
        raise FeatxError(f"figure_uri expects a matplotlib Figure, PNG bytes or the path of a PNG file, "
                         f"got {type(fig_or_png).__name__}; save a plot with fig.savefig(buffer, format='png')")
    if not data.startswith(_PNG_SIGNATURE):
        raise FeatxError(f"figure_uri expects a PNG image but {what} do not start with the PNG signature; "
                         "save the plot with format='png'")
    return _data_uri("image/png", data)


def _figure_png(fig, *, dpi: int) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib only for a figure

    buffer = io.BytesIO()
    try:
        FigureCanvasAgg(fig)  # attaches an Agg canvas: drawing needs no display
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")  # never import pyplot just to close
        if pyplot is not None:
            pyplot.close(fig)
    return buffer.getvalue()


class _Section:
    """One ``<section>``: its heading level and the blocks inside it (strings or sections)."""

    def __init__(self, title: str | None, level: int) -> None:
        self.title = title
        self.level = level
        self.blocks: list = []

    def render(self) -> str:
        parts = [b.render() if isinstance(b, _Section) else b for b in self.blocks]
        if self.title is None:
            return "\n".join(parts)
        head = f"<h{self.level}>{escape(self.title)}</h{self.level}>"
        return "<section>\n" + "\n".join([head, *parts]) + "\n</section>"


class Page:
    """An HTML page built block by block and rendered as one self-contained file.

    Every method that adds a block returns the page, so calls can be chained. Text is always
    escaped (wrap markup in :class:`Raw` to insert it as is); images are embedded as ``data:``
    URIs; the CSS is inline; the page needs no script, network or font file.

    Sections: ``page.section(title)`` adds a heading one level below the enclosing section
    (``<h2>`` at the top) and returns a context manager. Blocks added inside
    ``with page.section(...):`` go into that ``<section>`` element, and headings and sections
    inside it are one level deeper. Called without ``with`` it is simply a heading.

    Parameters
    ----------
    title : str
        The page's ``<title>`` and ``<h1>``.

    Examples
    --------
    >>> import numpy as np
    >>> page = Page("Results")
    >>> with page.section("Scores"):
    ...     _ = page.table([{"layer": "stage4", "accuracy": 0.91234}], caption="by layer")
    ...     _ = page.gallery([(np.zeros((8, 8, 3), np.uint8), "black\\nsecond line")], size=32)
    >>> text = page.render()
    >>> text.startswith("<!DOCTYPE html>"), "<td class=\\"num\\">0.9123</td>" in text, text.count("<img")
    (True, True, 1)
    """

    def __init__(self, title: str) -> None:
        self.title = str(title)
        self._root = _Section(None, 1)
        self._stack = [self._root]

    # -- blocks ---------------------------------------------------------------------------------

    def _add(self, block) -> Page:
        self._stack[-1].blocks.append(block)
        return self

    @property
    def _level(self) -> int:
        return min(self._stack[-1].level + 1, 6)

    def heading(self, text, level: int = 2) -> Page:
        """Add a heading ``<h{level}>`` (1 to 6)."""
        if isinstance(level, bool) or not isinstance(level, numbers.Integral) or not 1 <= level <= 6:
            raise FeatxError(f"heading level must be an integer from 1 to 6, got {level!r}")
        return self._add(f"<h{level}>{escape(text)}</h{level}>")

    def paragraph(self, text) -> Page:
        """Add a paragraph; line breaks in `text` are kept."""
        return self._add(f"<p>{_text_html(text)}</p>")

    def raw(self, markup: str) -> Page:
        """Add a block of HTML as it is (never text from data: use :meth:`paragraph`)."""
        return self._add(str(markup))

    def table(self, rows, columns: Sequence[str] | None = None, *, caption: str | None = None) -> Page:
        """Add a table.

        Parameters
        ----------
        rows : list of dict, list of sequences, or a pandas DataFrame
            Dicts give their keys as columns (in the order they first appear) unless `columns`
            names which and in what order; a missing key is an empty cell. Sequences are rows
            of cells, headed by `columns` if given. Numbers are written by
            :func:`format_value` and aligned right; text cells keep their line breaks.
        columns : sequence of str, optional
            The header (and, for dicts, the keys to show).
        caption : str, optional
            A caption above the table.

        Raises
        ------
        FeatxError
            If the rows mix dicts and sequences, or a sequence row is longer than `columns`.
        """
        if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a pandas DataFrame
            columns = list(rows.columns) if columns is None else list(columns)
            rows = rows.to_dict("records")
        rows = list(rows)
        kinds = {isinstance(row, Mapping) for row in rows}
        if len(kinds) > 1:
            raise FeatxError("table rows must be all dicts or all sequences, got a mix; "
                             "turn the sequences into dicts keyed by column name")
        if rows and kinds == {True}:
            if columns is None:
                columns = list(dict.fromkeys(key for row in rows for key in row))
            cells = [[row.get(column) for column in columns] for row in rows]
        else:
            cells = [list(row) for row in rows]
            if columns is not None:
                too_long = [len(row) for row in cells if len(row) > len(columns)]
                if too_long:
                    raise FeatxError(f"a table row has {max(too_long)} cells but only {len(columns)} columns "
                                     f"were named ({list(columns)}); name every column or shorten the rows")
        parts = ["<table>"]
        if caption is not None:
            parts.append(f"<caption>{escape(caption)}</caption>")
        if columns is not None:
            parts.append("<thead><tr>" + "".join(f"<th>{_text_html(c)}</th>" for c in columns) + "</tr></thead>")
        parts.append("<tbody>")
        for row in cells:
            parts.append("<tr>" + "".join(_cell(value) for value in row) + "</tr>")
        parts.append("</tbody></table>")
        return self._add("".join(parts))

    def figure(self, fig_or_png, alt: str, *, caption: str | None = None) -> Page:
        """Add a plot: a matplotlib Figure (drawn with Agg, then closed) or PNG bytes.

        `alt` is the image's text alternative; `caption` an optional line below it.
        """
        uri = figure_uri(fig_or_png)
        text = f"<figcaption>{_text_html(caption)}</figcaption>" if caption else ""
        return self._add(f'<figure class="plot"><img src="{uri}" alt="{escape(alt)}">{text}</figure>')

    def gallery(self, items: Iterable[tuple[object, str]], size: int = 96) -> Page:
        """Add a wrapping row of thumbnails, each in a ``size × size`` box with its caption.

        Parameters
        ----------
        items : iterable of (image, caption)
            Any image :func:`thumbnail_uri` takes; captions may hold several lines (``\\n``).
        size : int, default=96
            Side of each thumbnail's box, in CSS pixels.
        """
        figures = []
        for image, caption in items:
            uri = thumbnail_uri(image, size=size)
            alt = escape(str(caption).replace("\n", " "))
            figures.append(f'<figure style="width:{max(size + 8, 128)}px"><img src="{uri}" alt="{alt}" '
                           f'width="{size}" height="{size}"><figcaption>{_text_html(caption)}</figcaption></figure>')
        return self._add('<div class="gallery">' + "".join(figures) + "</div>")

    @contextlib.contextmanager
    def _enter(self, section: _Section) -> Iterator[Page]:
        self._stack.append(section)
        try:
            yield self
        finally:
            self._stack.remove(section)

    def section(self, title) -> contextlib.AbstractContextManager[Page]:
        """Add a section headed `title`; use it with ``with`` to put blocks inside it (see the class)."""
        section = _Section(str(title), self._level)
        self._add(section)
        return self._enter(section)

    # -- output ---------------------------------------------------------------------------------

    def render(self) -> str:
        """The whole page as one HTML5 document (str)."""
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<h1>{escape(self.title)}</h1>\n{self._root.render()}\n</main>\n"
            f"<footer>Made by featx {escape(__version__)}.</footer>\n</body>\n</html>\n"
        )

    def write(self, path: str | os.PathLike) -> str:
        """Write the page to `path` atomically (readers never see half a file); return the path."""
        atomic_write(path, self.render())
        return os.fspath(path)


def _cell(value) -> str:
    if isinstance(value, Raw):
        return f"<td>{value}</td>"
    if _is_number(value):
        return f'<td class="num">{escape(format_value(value))}</td>'
    return f"<td>{_text_html(format_value(value))}</td>"
