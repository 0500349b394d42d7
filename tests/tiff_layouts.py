"""Small tiled TIFF / SVS slides in many on-disk layouts, written with tifffile, for the direct reader's tests.

`write_layout(path, layout)` writes one `Layout` and returns a `Written`: the arrays given to the encoder
(`levels[0]` is level 0) and the file's path. Lossy layouts store approximately those arrays; the exact
references are OpenSlide's level-0 `read_region` and `stored_level(path, k)` (what the file stores at level k,
decoded as OpenSlide would, see below).

Layouts (`LAYOUTS`, by name):

- JPEG RGB photometric: tifffile's own JPEG (`outcolorspace="RGB"`, no subsampling; each tile a full
  stream) and Aperio's way: abbreviated tile streams (no DQT/DHT) sharing one JPEGTables tag (347).
- JPEG YCbCr photometric with 2 x 2 chroma subsampling: tifffile's own and abbreviated + JPEGTables.
- Aperio JPEG 2000 codestreams: 33003 (YCbCr components, no multi-component transform) and 33005 (RGB, with
  the irreversible colour transform), lossy; SVS only (OpenSlide's generic-tiff driver has no J2K codec).
- deflate, LZW, zstd, uncompressed (zstd only if `openslide_reads_zstd()`: libtiff may lack it; it does
  here). Uncompressed tiles are 256: libopenslide 4.0.1's libtiff rejects uncompressed 240 x 240 tiles
  ("Invalid tile byte count ... Expected 172800, got 173056"), so there is no OpenSlide reference for them.
- tile sizes 240, 256, 512; odd sizes (1001 x 703); pyramids 1/4/16 with Aperio-style level sizes (ceil or
  floor of w / 4**k, so OpenSlide's downsamples are like 4.0005) and 1/2/4.
- SVS (Aperio ImageDescription with MPP and AppMag on level 0) or generic tiled TIFF (resolution tags,
  reduced levels marked subfiletype=1).
- Fallback layouts the direct reader must leave to OpenSlide: palette (photometric 3) and 16-bit RGB tiled
  TIFFs (OpenSlide reads both through libtiff's RGBA path).

OpenSlide's decode of 33003 (openslide-decode-jp2k.c + make-tables.c): with Y, Cb, Cr the 8-bit components,
  R = clamp(Y + round(1.402 (Cr - 128)))
  G = clamp(Y + ((round(65536 (0.5 - 0.34414 (Cb - 128))) + round(65536 (-0.71414 (Cr - 128)))) >> 16))
  B = clamp(Y + round(1.772 (Cb - 128)))
with C's round (half away from zero), an arithmetic shift and clamp to [0, 255]; subsampled chroma is
repeated (nearest). `openslide_ycbcr_to_rgb` is that, in NumPy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from slide_fixtures import he_like

__all__ = ["Layout", "Written", "LAYOUTS", "DIRECT_LAYOUTS", "FALLBACK_LAYOUTS", "write_layout", "stored_level",
           "openslide_region", "openslide_ycbcr_to_rgb", "rgb_to_ycbcr", "split_jpeg_tables", "level_sizes",
           "openslide_reads_zstd", "APERIO_DESCRIPTION",
           "ycbcr_hard_triples", "write_j2k_triples"]

APERIO_DESCRIPTION = ("Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) {codec} Q=70"
                      "|AppMag = 40|MPP = 0.2527|Filename = layout")
MPP = 0.2527  # generic TIFFs get the same via their resolution tags
JPEG_QUALITY = 80
J2K_PSNR = 40  # imagecodecs jpeg2k_encode level: lossy, so decoder rounding would show


@dataclass(frozen=True)
class Layout:
    """One way of storing a slide. `codec` is one of CODECS; `direct` says the direct reader must serve it."""

    name: str
    codec: str
    tile: int = 256
    size: tuple[int, int] = (1001, 703)        # level-0 width, height
    downsamples: tuple[int, ...] = (1, 4, 16)  # nominal; the level sizes come from `rounding`
    rounding: str = "ceil"                     # level size = ceil or floor of level-0 size / downsample
    svs: bool = False
    seed: int = 0

    @property
    def direct(self) -> bool:
        return self.codec not in ("palette", "rgb16")

    @property
    def lossless(self) -> bool:
        return self.codec in ("deflate", "lzw", "zstd", "none", "palette", "rgb16")


CODECS = ("jpeg_rgb", "jpeg_ycbcr", "jpeg_rgb_tables", "jpeg_ycbcr_tables", "j2k_ycbcr", "j2k_rgb", "deflate",
          "lzw", "zstd", "none", "palette", "rgb16")
_APERIO_CODEC = {"j2k_ycbcr": "J2K/YUV16", "j2k_rgb": "J2K/KDU", "jpeg_rgb": "JPEG/RGB",
                 "jpeg_rgb_tables": "JPEG/RGB", "jpeg_ycbcr": "JPEG/YCC", "jpeg_ycbcr_tables": "JPEG/YCC"}


@dataclass
class Written:
    path: Path
    layout: Layout
    levels: list[np.ndarray] = field(default_factory=list)  # what was given to the encoder, per level

    @property
    def level0(self) -> np.ndarray:
        return self.levels[0]


def level_sizes(layout: Layout) -> list[tuple[int, int]]:
    w, h = layout.size
    f = math.ceil if layout.rounding == "ceil" else math.floor
    return [(max(1, f(w / ds)), max(1, f(h / ds))) for ds in layout.downsamples]


def _area_resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    import cv2

    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def _tiles(arr: np.ndarray, t: int):
    """Row-major tiles of t x t, edge tiles padded (with edge pixels, as encoders see them)."""
    h, w = arr.shape[:2]
    for y in range(0, h, t):
        for x in range(0, w, t):
            tile = arr[y:y + t, x:x + t]
            if tile.shape[:2] != (t, t):
                tile = np.pad(tile, ((0, t - tile.shape[0]), (0, t - tile.shape[1]), (0, 0)), mode="edge")
            yield np.ascontiguousarray(tile)


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """JFIF full-range RGB -> YCbCr, rounded (the encoder side of 33003; any rounding would do)."""
    f = rgb.astype(np.float64)
    y = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    cb = 128 - 0.168736 * f[..., 0] - 0.331264 * f[..., 1] + 0.5 * f[..., 2]
    cr = 128 + 0.5 * f[..., 0] - 0.418688 * f[..., 1] - 0.081312 * f[..., 2]
    return np.clip(np.rint(np.stack([y, cb, cr], -1)), 0, 255).astype(np.uint8)


def _c_round(v: np.ndarray) -> np.ndarray:
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int64)


_I = np.arange(256, dtype=np.float64) - 128
_R_CR = _c_round(1.402 * _I)
_G_CB = _c_round(65536 * (0.5 - 0.34414 * _I))
_G_CR = _c_round(65536 * -0.71414 * _I)
_B_CB = _c_round(1.772 * _I)


def openslide_ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """OpenSlide's 33003 conversion (its make-tables.c tables), bit for bit, on full-resolution components."""
    y = ycc[..., 0].astype(np.int64)
    cb, cr = ycc[..., 1], ycc[..., 2]
    r = y + _R_CR[cr]
    g = y + ((_G_CB[cb] + _G_CR[cr]) >> 16)
    b = y + _B_CB[cb]
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def split_jpeg_tables(stream: bytes, numbered_components: bool = False) -> tuple[bytes, bytes]:
    """Split a full JPEG into (tables, abbreviated stream) the way Aperio stores tiles: JPEGTables is
    SOI + every DQT and DHT + EOI; the tile keeps SOI, SOF, SOS and the entropy-coded data (APPn dropped).

    `numbered_components` renames libjpeg's RGB component ids 'R', 'G', 'B' to 1, 2, 3 in SOF and SOS (as
    Aperio's encoder numbers them): with neither an Adobe marker nor RGB ids a decoder left to guess takes
    the stream for YCbCr, so only one told the colour space by the TIFF photometric decodes it right."""
    assert stream[:2] == b"\xff\xd8"
    tables, rest, i = [], [], 2
    while True:
        assert stream[i] == 0xFF, f"bad marker at {i}"
        marker = stream[i + 1]
        seglen = int.from_bytes(stream[i + 2:i + 4], "big")
        seg = stream[i:i + 2 + seglen]
        if numbered_components and marker in (0xC0, 0xDA):
            seg = bytearray(seg)
            first, step = (10, 3) if marker == 0xC0 else (5, 2)
            for j in range(seg[first - 1]):
                seg[first + j * step] = {0x52: 1, 0x47: 2, 0x42: 3}.get(seg[first + j * step], seg[first + j * step])
            seg = bytes(seg) + (stream[i + 2 + seglen:] if marker == 0xDA else b"")
        if marker == 0xDA:  # SOS: the rest is scan data up to EOI
            rest.append(seg if numbered_components else stream[i:])
            break
        if marker in (0xDB, 0xC4):
            tables.append(seg)
        elif not 0xE0 <= marker <= 0xEF:
            rest.append(seg)
        i += 2 + seglen
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(rest)


def _jpeg_tiles(arr: np.ndarray, t: int, ycbcr: bool) -> tuple[bytes, list[bytes]]:
    tables, tiles = None, []
    for tile in _tiles(arr, t):
        if ycbcr:
            full = imagecodecs.jpeg8_encode(tile, JPEG_QUALITY, colorspace="RGB", outcolorspace="YCBCR",
                                            subsampling="420", optimize=False)
        else:
            full = imagecodecs.jpeg8_encode(tile, JPEG_QUALITY, colorspace="RGB", outcolorspace="RGB",
                                            subsampling="444", optimize=False)
        tab, abbrev = split_jpeg_tables(bytes(full), numbered_components=not ycbcr)
        assert tables is None or tab == tables, "tiles must share their tables"
        tables = tab
        tiles.append(abbrev)
    return tables, tiles


def _j2k_tiles(arr: np.ndarray, t: int, ycbcr: bool) -> list[bytes]:
    out = []
    for tile in _tiles(arr, t):
        if ycbcr:
            out.append(bytes(imagecodecs.jpeg2k_encode(rgb_to_ycbcr(tile), J2K_PSNR, codecformat="J2K",
                                                       mct=False, reversible=False)))
        else:
            out.append(bytes(imagecodecs.jpeg2k_encode(tile, J2K_PSNR, codecformat="J2K", mct=True,
                                                       reversible=False)))
    return out


def make_levels(layout: Layout) -> list[np.ndarray]:
    w, h = layout.size
    level0 = he_like(h, w, seed=layout.seed)
    levels = [level0]
    for lw, lh in level_sizes(layout)[1:]:
        levels.append(_area_resize(level0, lw, lh))
    return levels


def write_layout(path: Path | str, layout: Layout) -> Written:
    path = Path(path)
    levels = make_levels(layout)
    w0, h0 = layout.size
    t = layout.tile
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for k, arr in enumerate(levels):
            h, w = arr.shape[:2]
            kw: dict = {"tile": (t, t), "metadata": None}
            if k == 0 and layout.svs:
                kw["description"] = APERIO_DESCRIPTION.format(w=w0, h=h0, t=t,
                                                              codec=_APERIO_CODEC.get(layout.codec, "RAW"))
            if k > 0:
                kw["subfiletype"] = 1
                if layout.svs:
                    kw["description"] = f"Aperio Image Library v12.0.15\r\n{w0}x{h0} -> {w}x{h}"
            if not layout.svs:
                per_cm = 1e4 / (MPP * w0 / w)
                kw["resolution"] = (per_cm, per_cm)
                kw["resolutionunit"] = "CENTIMETER"
            c = layout.codec
            if c == "jpeg_rgb":
                tw.write(arr, photometric="rgb", compression="jpeg", subsampling=(1, 1),
                         compressionargs={"level": JPEG_QUALITY, "outcolorspace": "RGB"}, **kw)
            elif c == "jpeg_ycbcr":
                tw.write(arr, photometric="rgb", compression="jpeg", subsampling=(2, 2),
                         compressionargs={"level": JPEG_QUALITY}, **kw)
            elif c in ("jpeg_rgb_tables", "jpeg_ycbcr_tables"):
                ycc = c == "jpeg_ycbcr_tables"
                tables, tiles = _jpeg_tiles(arr, t, ycc)
                if ycc:
                    kw["photometric"] = "ycbcr"
                    kw["subsampling"] = (2, 2)
                    kw["extratags"] = [(532, 5, 6, (0, 1, 255, 1, 128, 1, 255, 1, 128, 1, 255, 1), True)]
                else:
                    kw["photometric"] = "rgb"
                    kw["compressionargs"] = {"outcolorspace": "RGB"}
                    kw["subsampling"] = (1, 1)
                tw.write(iter(tiles), shape=(h, w, 3), dtype=np.uint8, compression=7, jpegtables=tables, **kw)
            elif c in ("j2k_ycbcr", "j2k_rgb"):
                tiles = _j2k_tiles(arr, t, c == "j2k_ycbcr")
                tw.write(iter(tiles), shape=(h, w, 3), dtype=np.uint8, photometric="rgb",
                         compression=33003 if c == "j2k_ycbcr" else 33005, **kw)
            elif c == "deflate":
                tw.write(arr, photometric="rgb", compression="zlib", compressionargs={"level": 6}, **kw)
            elif c == "lzw":
                tw.write(arr, photometric="rgb", compression="lzw", **kw)
            elif c == "zstd":
                tw.write(arr, photometric="rgb", compression="zstd", **kw)
            elif c == "none":
                tw.write(arr, photometric="rgb", compression=None, **kw)
            elif c == "palette":
                idx, cmap = _palette(arr)
                levels[k] = (np.moveaxis(cmap[:, idx], 0, -1) >> 8).astype(np.uint8)
                tw.write(idx, photometric="palette", colormap=cmap, compression="zlib", **kw)
            elif c == "rgb16":
                tw.write(arr.astype(np.uint16) * 257, photometric="rgb", compression="zlib", **kw)
            else:
                raise ValueError(f"unknown codec {c!r}; use one of {CODECS}")
    return Written(path, layout, levels)


def _palette(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit palette image: 6x7x6 colour cube (the RGBA path expands it by >> 8 of the 16-bit map)."""
    r = np.rint(arr[..., 0] / 255 * 5).astype(np.uint8)
    g = np.rint(arr[..., 1] / 255 * 6).astype(np.uint8)
    b = np.rint(arr[..., 2] / 255 * 5).astype(np.uint8)
    idx = (r * 42 + g * 6 + b).astype(np.uint8)
    cmap = np.zeros((3, 256), np.uint16)
    i = np.arange(252)
    cmap[0, :252] = np.rint((i // 42) / 5 * 255).astype(np.uint16) * 257
    cmap[1, :252] = np.rint(((i // 6) % 7) / 6 * 255).astype(np.uint16) * 257
    cmap[2, :252] = np.rint((i % 6) / 5 * 255).astype(np.uint16) * 257
    return idx, cmap


def stored_level(path: Path | str, level: int) -> np.ndarray:
    """The RGB pixels stored at `level` (the level-th tiled page), decoded with tifffile; 33003 pages are
    decoded to their YCbCr components and converted with OpenSlide's integer formula."""
    with tifffile.TiffFile(path) as tf:
        pages = [p for p in tf.pages if p.is_tiled]
        page = pages[level]
        arr = page.asarray()
        if page.compression == 33003:
            arr = openslide_ycbcr_to_rgb(arr)
        elif page.photometric == tifffile.PHOTOMETRIC.PALETTE:
            arr = np.moveaxis(page.colormap[:, arr], 0, -1)
        if arr.dtype == np.uint16:  # libtiff's RGBA path keeps the high byte
            arr = (arr >> 8).astype(np.uint8)
        return arr


def openslide_region(osr, l0_x: int, l0_y: int, level: int, w: int, h: int) -> np.ndarray:
    """OpenSlide's read_region composited on white, as H x W x 3 uint8: libopenslide's premultiplied ARGB
    words (read through openslide-python's low-level binding, before it un-premultiplies) with
    channel + (255 - alpha), exact; fully transparent (outside the slide) -> 255."""
    import openslide.lowlevel as ll

    buf = np.zeros((h, w), np.uint32)
    ll._read_region(osr._osr, buf.ctypes.data_as(ll.POINTER(ll.c_uint32)), l0_x, l0_y, level, w, h)
    argb = buf.astype("<u4").view(np.uint8).reshape(h, w, 4)  # little-endian bytes: B, G, R, A
    a = argb[..., 3:4].astype(np.int16)
    return (argb[..., 2::-1] + (255 - a)).astype(np.uint8)


def ycbcr_hard_triples() -> np.ndarray:
    """256 x 256 x 3 YCbCr: first every (Cb, Cr) pair where OpenSlide's G chroma (two tables, each rounded,
    summed, >> 16) differs from one rounding of the sum, each with every Y (so the clamps at both ends are
    hit too), then a seeded random fill."""
    cb, cr = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    cb, cr = cb.ravel(), cr.ravel()
    exact = (_G_CB[cb] + _G_CR[cr]) >> 16
    one_rounding = (-22554 * (cb - 128) - 46802 * (cr - 128) + 32768) >> 16
    hard = np.nonzero(exact != one_rounding)[0]
    rng = np.random.default_rng(0)
    hard = hard[:128]  # 24 pairs with OpenSlide 4.0.1's tables
    n_hard = 256 * len(hard)
    pairs = np.concatenate([np.repeat(hard, 256), rng.integers(0, 65536, 65536 - n_hard)])
    y = np.concatenate([np.tile(np.arange(256), len(hard)), rng.integers(0, 256, 65536 - n_hard)])
    return np.stack([y, cb[pairs], cr[pairs]], -1).astype(np.uint8).reshape(256, 256, 3)


def write_j2k_triples(path: Path | str) -> np.ndarray:
    """A one-tile (256 x 256) 33003 SVS, losslessly coded, of `ycbcr_hard_triples()`; returns the RGB
    OpenSlide must show (`openslide_ycbcr_to_rgb` of it, checked against libopenslide 4.0.1: identical)."""
    ycc = ycbcr_hard_triples()
    cs = bytes(imagecodecs.jpeg2k_encode(ycc, codecformat="J2K", mct=False, reversible=True))
    with tifffile.TiffWriter(path) as tw:
        tw.write(iter([cs]), shape=(256, 256, 3), dtype=np.uint8, photometric="rgb", compression=33003,
                 tile=(256, 256), metadata=None,
                 description=APERIO_DESCRIPTION.format(w=256, h=256, t=256, codec="J2K/YUV16"))
    return openslide_ycbcr_to_rgb(ycc)


_ZSTD_OK: bool | None = None


def openslide_reads_zstd(tmpdir: Path | str) -> bool:
    """Whether this libopenslide's libtiff decodes zstd tiles (checked once by writing a tiny file)."""
    global _ZSTD_OK
    if _ZSTD_OK is None:
        import openslide

        p = Path(tmpdir) / "zstd_probe.tif"
        w = write_layout(p, Layout("zstd_probe", "zstd", tile=256, size=(300, 200), downsamples=(1,)))
        try:
            with openslide.OpenSlide(str(p)) as osr:
                _ZSTD_OK = bool(np.array_equal(openslide_region(osr, 0, 0, 0, 300, 200), w.level0))
        except Exception:
            _ZSTD_OK = False
    return _ZSTD_OK


LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in [
    Layout("svs_jpeg_rgb_tables_240", "jpeg_rgb_tables", tile=240, svs=True, rounding="ceil", seed=1),
    Layout("svs_jpeg_ycbcr_tables_256", "jpeg_ycbcr_tables", tile=256, svs=True, rounding="floor", seed=2),
    Layout("tif_jpeg_rgb_tables_512", "jpeg_rgb_tables", tile=512, downsamples=(1, 2, 4), seed=3),
    Layout("tif_jpeg_rgb_256", "jpeg_rgb", tile=256, downsamples=(1, 2, 4), rounding="floor", seed=4),
    Layout("svs_jpeg_ycbcr_512", "jpeg_ycbcr", tile=512, svs=True, seed=5),
    Layout("tif_jpeg_ycbcr_240", "jpeg_ycbcr", tile=240, downsamples=(1, 2, 4), seed=6),
    Layout("svs_j2k_ycbcr_240", "j2k_ycbcr", tile=240, svs=True, seed=7),
    Layout("svs_j2k_rgb_256", "j2k_rgb", tile=256, svs=True, rounding="floor", seed=8),
    Layout("tif_deflate_256", "deflate", tile=256, downsamples=(1, 2, 4), seed=9),
    Layout("svs_deflate_240", "deflate", tile=240, svs=True, seed=10),
    Layout("tif_lzw_512", "lzw", tile=512, rounding="floor", seed=11),
    Layout("tif_zstd_256", "zstd", tile=256, downsamples=(1, 2, 4), seed=12),
    Layout("tif_deflate_exact_256", "deflate", tile=256, size=(1024, 768), downsamples=(1, 2, 4), seed=16),
    Layout("tif_none_256", "none", tile=256, downsamples=(1, 2, 4), rounding="floor", seed=13),
    Layout("tif_palette_256", "palette", tile=256, downsamples=(1, 2), seed=14),
    Layout("tif_rgb16_256", "rgb16", tile=256, downsamples=(1, 2), seed=15),
]}
DIRECT_LAYOUTS = [n for n, lay in LAYOUTS.items() if lay.direct]
FALLBACK_LAYOUTS = [n for n, lay in LAYOUTS.items() if not lay.direct]
