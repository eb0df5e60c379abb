import base64
import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from featx.exceptions import FeatxError, ImageDecodeError
from featx.html import Page, Raw, escape, figure_uri, format_value, thumbnail_uri

from conftest import colour_pixels


def _decode_uri(uri: str, mime: str) -> Image.Image:
    prefix = f"data:{mime};base64,"
    assert uri.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(uri[len(prefix):])))


def test_escape_escapes_markup_and_quotes():
    """Check that text with markup characters and quotes comes out inert."""
    assert escape("<script>alert('x') & \"y\"</script>") == (
        "&lt;script&gt;alert(&#x27;x&#x27;) &amp; &quot;y&quot;&lt;/script&gt;")
    assert escape(3) == "3"


def test_format_value_writes_numbers_compactly():
    """Check that ints stay whole, floats keep 4 significant digits, and missing values are empty."""
    assert format_value(np.int64(12345)) == "12345" and format_value(np.float32(0.5)) == "0.5"
    assert format_value(2 / 3) == "0.6667" and format_value(98765.4) == "98765"
    assert format_value(None) == "" and format_value(float("nan")) == "" and format_value(True) == "True"


@pytest.mark.parametrize("make", [
    lambda: np.zeros((300, 150, 3), np.uint8),
    lambda: np.zeros((300, 150), np.uint8),
    lambda: np.zeros((300, 150, 4), np.uint8),
    lambda: np.zeros((300, 150, 3), np.float32),
    lambda: Image.new("RGB", (150, 300)),
])
def test_thumbnail_uri_fits_the_box_and_keeps_the_aspect(make):
    """Check that arrays (grey, RGB, RGBA, float) and PIL images become JPEG thumbnails within the box."""
    thumb = _decode_uri(thumbnail_uri(make(), size=64), "image/jpeg")
    assert thumb.format == "JPEG" and thumb.size == (32, 64)


def test_thumbnail_uri_reads_a_file_and_keeps_its_colour(tmp_path):
    """Check that a file path gives a thumbnail of that file's pixels."""
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 20), (220, 20, 20)).save(path)
    thumb = _decode_uri(thumbnail_uri(path, size=96), "image/jpeg").convert("RGB")
    r, g, b = thumb.getpixel((10, 10))
    assert thumb.size == (40, 20) and r > 180 and g < 60 and b < 60


def test_thumbnail_uri_rejects_bad_size_and_bad_images(tmp_path):
    """Check that a bad size and an undecodable file raise featx errors that say what is wrong."""
    with pytest.raises(FeatxError, match="positive number of pixels"):
        thumbnail_uri(np.zeros((4, 4), np.uint8), size=0)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        thumbnail_uri(broken)


def test_figure_uri_draws_a_figure_and_closes_it():
    """Check that a pyplot figure becomes a PNG URI and is closed afterwards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [0, 1])
    number = fig.number
    picture = _decode_uri(figure_uri(fig), "image/png")
    assert picture.format == "PNG" and picture.size[0] > 50
    assert number not in plt.get_fignums()


def test_figure_uri_takes_png_bytes_and_a_path_and_rejects_others(tmp_path):
    """Check that PNG bytes and a PNG file pass through, and other data are refused with the fix."""
    buffer = io.BytesIO()
    Image.new("RGB", (5, 5)).save(buffer, format="PNG")
    png = buffer.getvalue()
    (tmp_path / "plot.png").write_bytes(png)
    assert figure_uri(png) == figure_uri(tmp_path / "plot.png") == "data:image/png;base64," + base64.b64encode(
        png).decode()
    with pytest.raises(FeatxError, match="PNG signature"):
        figure_uri(b"GIF89a")
    with pytest.raises(FeatxError, match="got int"):
        figure_uri(3)


def test_page_table_from_dicts_and_sequences():
    """Check that dict rows take their keys as header, sequences take the columns, and cells are escaped."""
    page = Page("t")
    page.table([{"name": "<a>", "score": 0.912345}, {"name": "b", "extra": 3}], caption="scores")
    page.table([("x", 1), ("y", 2)], columns=["label", "n"])
    text = page.render()
    assert "<caption>scores</caption>" in text
    assert "<thead><tr><th>name</th><th>score</th><th>extra</th></tr></thead>" in text
    assert "<td>&lt;a&gt;</td><td class=\"num\">0.9123</td><td></td>" in text
    assert "<th>label</th><th>n</th>" in text and "<td>y</td><td class=\"num\">2</td>" in text


def test_page_table_takes_a_dataframe_and_selects_columns():
    """Check that a DataFrame gives its columns and that columns= picks and orders dict keys."""
    pd = pytest.importorskip("pandas")
    text = Page("t").table(pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})).render()
    assert "<th>a</th><th>b</th>" in text and "<td class=\"num\">2</td><td>y</td>" in text
    text = Page("t").table([{"a": 1, "b": 2}], columns=["b"]).render()
    assert "<th>b</th></tr>" in text and ">1<" not in text


def test_page_table_refuses_mixed_rows_and_too_long_rows():
    """Check that mixed row kinds and rows longer than the header are refused with the fix."""
    with pytest.raises(FeatxError, match="all dicts or all sequences"):
        Page("t").table([{"a": 1}, (1,)])
    with pytest.raises(FeatxError, match="3 cells but only 2 columns"):
        Page("t").table([(1, 2, 3)], columns=["a", "b"])


def test_page_gallery_embeds_every_image_with_multiline_captions():
    """Check that a gallery embeds one JPEG per item, with line breaks in captions and escaped text."""
    items = [(np.full((20, 30, 3), i * 40, np.uint8), f"true <b>\npred {i}") for i in range(3)]
    text = Page("g").gallery(items, size=48).render()
    assert text.count('src="data:image/jpeg;base64,') == 3
    assert "true &lt;b&gt;<br>pred 2" in text and 'width="48" height="48"' in text


def test_page_sections_nest_headings():
    """Check that sections used with 'with' nest their content and headings, and plain calls are headings."""
    page = Page("Doc")
    with page.section("Outer"):
        page.paragraph("inside")
        with page.section("Inner"):
            page.paragraph("deeper")
    page.section("Plain")
    page.paragraph("after")
    text = page.render()
    assert re.search(r"<section>\n<h2>Outer</h2>\n<p>inside</p>\n<section>\n<h3>Inner</h3>\n<p>deeper</p>\n"
                     r"</section>\n</section>", text)
    assert "<section>\n<h2>Plain</h2>\n</section>\n<p>after</p>" in text


def test_page_heading_refuses_a_bad_level():
    """Check that a heading level outside 1..6 is refused."""
    with pytest.raises(FeatxError, match="from 1 to 6"):
        Page("t").heading("x", level=7)


def test_page_render_is_self_contained():
    """Check that the page is HTML5 with inline CSS and no script, link or remote reference."""
    page = Page("A <title>")
    page.paragraph("one\ntwo").table([{"raw": Raw("<i>ok</i>")}]).figure(_png(), alt="plot")
    text = page.render()
    assert text.startswith("<!DOCTYPE html>") and "<title>A &lt;title&gt;</title>" in text
    assert "<style>" in text and "<p>one<br>two</p>" in text and "<td><i>ok</i></td>" in text
    assert not re.search(r"<script|<link|https?://|@import|url\(", text)


def test_page_write_is_atomic_and_returns_the_path(tmp_path):
    """Check that write puts the whole page in the file and leaves no temporary beside it."""
    target = tmp_path / "page.html"
    assert Page("t").paragraph("x").write(target) == os.fspath(target)
    assert target.read_text(encoding="utf-8").endswith("</html>\n") and os.listdir(tmp_path) == ["page.html"]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 0, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_page_renders_its_images_and_tables_in_chromium(chromium, tmp_path):
    """Check in headless Chromium that a page's thumbnails, figure and table render, and that a broken
    image is caught (the check can fail)."""
    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 60, 230)}
    page = Page("Rendering")
    with page.section("Gallery"):
        page.gallery([(np.full((40, 40, 3), c, np.uint8), name) for name, c in colours.items()], size=96)
    page.figure(_png(), alt="plot").table([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}])
    good = tmp_path / "good.html"
    page.write(good)
    seen = chromium.check(good)
    assert seen["images"] == seen["loaded"] == 4 and seen["broken"] == []
    assert seen["tables"] == 1 and seen["table_rows"] == 2 and seen["headings"] == ["Rendering", "Gallery"]
    shot = chromium.screenshot(good, tmp_path / "good.png", width=800, height=600)
    for colour in colours.values():  # each 96×96 thumbnail: 9216 pixels of its colour
        assert colour_pixels(shot, colour, tolerance=30) > 8000
    page.raw('<img src="data:image/jpeg;base64,AAAA" alt="broken">')
    bad = tmp_path / "bad.html"
    page.write(bad)
    seen = chromium.check(bad)
    assert seen["images"] == 5 and seen["loaded"] == 4 and seen["broken"] == ["broken"]
