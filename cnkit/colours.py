"""Named colours: the toy worlds' palettes and the segmentation classes' colours.

A foundation module (numpy only) so that the worlds that paint with these colours (``cnkit.data.toyworld``) and
the measures that read them back from images (``cnkit.metrics``) share one table. Two palettes:

- ``PALETTE``: the kit's own eight single-word colours (the ``fill`` and ``shapes`` worlds);
- ``X11``: the 140 CSS/X11 colours written as Fill50K's prompts write them, split into words ("pale golden rod",
  "old lace", "light golden rod yellow"; ``gray`` spellings, no ``grey`` duplicates, no ``rebeccapurple``): the
  vocabulary of the real Fill50K, which the ``fill50k`` and ``fill-x11`` worlds paint with. The kit's eight are
  CSS names with the same values, so they are among the 140.

Colour distance is perceptual: CIEDE2000 (``delta_e``) on CIELAB under D65, the standard formula of Sharma, Wu and
Dalal (2005). A difference of about 2 is just noticeable; 10 is "the same colour, a clearly different shade".
"""

from __future__ import annotations

import numpy as np

# Named colours (CSS values). Single words, so prompts stay whole-word tokens for the tiny CLIP.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "orange": (255, 165, 0),
    "purple": (128, 0, 128),
}
COLOUR_NAMES = tuple(PALETTE)

# Segmentation colours per class (index 0 is the background), distinct from one another.
SEGMENTATION_COLOURS: dict[str, tuple[int, int, int]] = {
    "background": (0, 0, 0),
    "circle": (230, 25, 75),
    "square": (60, 180, 75),
    "triangle": (0, 130, 200),
}


# CSS/X11 colours by the words Fill50K's prompts use for them (the CSS keyword with its words separated).
X11: dict[str, tuple[int, int, int]] = {
    "alice blue": (240, 248, 255),
    "antique white": (250, 235, 215),
    "aqua": (0, 255, 255),
    "aquamarine": (127, 255, 212),
    "azure": (240, 255, 255),
    "beige": (245, 245, 220),
    "bisque": (255, 228, 196),
    "black": (0, 0, 0),
    "blanched almond": (255, 235, 205),
    "blue": (0, 0, 255),
    "blue violet": (138, 43, 226),
    "brown": (165, 42, 42),
    "burly wood": (222, 184, 135),
    "cadet blue": (95, 158, 160),
    "chartreuse": (127, 255, 0),
    "chocolate": (210, 105, 30),
    "coral": (255, 127, 80),
    "cornflower blue": (100, 149, 237),
    "corn silk": (255, 248, 220),
    "crimson": (220, 20, 60),
    "cyan": (0, 255, 255),
    "dark blue": (0, 0, 139),
    "dark cyan": (0, 139, 139),
    "dark golden rod": (184, 134, 11),
    "dark gray": (169, 169, 169),
    "dark green": (0, 100, 0),
    "dark khaki": (189, 183, 107),
    "dark magenta": (139, 0, 139),
    "dark olive green": (85, 107, 47),
    "dark orange": (255, 140, 0),
    "dark orchid": (153, 50, 204),
    "dark red": (139, 0, 0),
    "dark salmon": (233, 150, 122),
    "dark sea green": (143, 188, 143),
    "dark slate blue": (72, 61, 139),
    "dark slate gray": (47, 79, 79),
    "dark turquoise": (0, 206, 209),
    "dark violet": (148, 0, 211),
    "deep pink": (255, 20, 147),
    "deep sky blue": (0, 191, 255),
    "dim gray": (105, 105, 105),
    "dodger blue": (30, 144, 255),
    "fire brick": (178, 34, 34),
    "floral white": (255, 250, 240),
    "forest green": (34, 139, 34),
    "fuchsia": (255, 0, 255),
    "gainsboro": (220, 220, 220),
    "ghost white": (248, 248, 255),
    "gold": (255, 215, 0),
    "golden rod": (218, 165, 32),
    "gray": (128, 128, 128),
    "green": (0, 128, 0),
    "green yellow": (173, 255, 47),
    "honey dew": (240, 255, 240),
    "hot pink": (255, 105, 180),
    "indian red": (205, 92, 92),
    "indigo": (75, 0, 130),
    "ivory": (255, 255, 240),
    "khaki": (240, 230, 140),
    "lavender": (230, 230, 250),
    "lavender blush": (255, 240, 245),
    "lawn green": (124, 252, 0),
    "lemon chiffon": (255, 250, 205),
    "light blue": (173, 216, 230),
    "light coral": (240, 128, 128),
    "light cyan": (224, 255, 255),
    "light golden rod yellow": (250, 250, 210),
    "light gray": (211, 211, 211),
    "light green": (144, 238, 144),
    "light pink": (255, 182, 193),
    "light salmon": (255, 160, 122),
    "light sea green": (32, 178, 170),
    "light sky blue": (135, 206, 250),
    "light slate gray": (119, 136, 153),
    "light steel blue": (176, 196, 222),
    "light yellow": (255, 255, 224),
    "lime": (0, 255, 0),
    "lime green": (50, 205, 50),
    "linen": (250, 240, 230),
    "magenta": (255, 0, 255),
    "maroon": (128, 0, 0),
    "medium aquamarine": (102, 205, 170),
    "medium blue": (0, 0, 205),
    "medium orchid": (186, 85, 211),
    "medium purple": (147, 112, 219),
    "medium sea green": (60, 179, 113),
    "medium slate blue": (123, 104, 238),
    "medium spring green": (0, 250, 154),
    "medium turquoise": (72, 209, 204),
    "medium violet red": (199, 21, 133),
    "midnight blue": (25, 25, 112),
    "mint cream": (245, 255, 250),
    "misty rose": (255, 228, 225),
    "moccasin": (255, 228, 181),
    "navajo white": (255, 222, 173),
    "navy": (0, 0, 128),
    "old lace": (253, 245, 230),
    "olive": (128, 128, 0),
    "olive drab": (107, 142, 35),
    "orange": (255, 165, 0),
    "orange red": (255, 69, 0),
    "orchid": (218, 112, 214),
    "pale golden rod": (238, 232, 170),
    "pale green": (152, 251, 152),
    "pale turquoise": (175, 238, 238),
    "pale violet red": (219, 112, 147),
    "papaya whip": (255, 239, 213),
    "peach puff": (255, 218, 185),
    "peru": (205, 133, 63),
    "pink": (255, 192, 203),
    "plum": (221, 160, 221),
    "powder blue": (176, 224, 230),
    "purple": (128, 0, 128),
    "red": (255, 0, 0),
    "rosy brown": (188, 143, 143),
    "royal blue": (65, 105, 225),
    "saddle brown": (139, 69, 19),
    "salmon": (250, 128, 114),
    "sandy brown": (244, 164, 96),
    "sea green": (46, 139, 87),
    "sea shell": (255, 245, 238),
    "sienna": (160, 82, 45),
    "silver": (192, 192, 192),
    "sky blue": (135, 206, 235),
    "slate blue": (106, 90, 205),
    "slate gray": (112, 128, 144),
    "snow": (255, 250, 250),
    "spring green": (0, 255, 127),
    "steel blue": (70, 130, 180),
    "tan": (210, 180, 140),
    "teal": (0, 128, 128),
    "thistle": (216, 191, 216),
    "tomato": (255, 99, 71),
    "turquoise": (64, 224, 208),
    "violet": (238, 130, 238),
    "wheat": (245, 222, 179),
    "white": (255, 255, 255),
    "white smoke": (245, 245, 245),
    "yellow": (255, 255, 0),
    "yellow green": (154, 205, 50),
}
X11_NAMES = tuple(X11)
X11_WORDS = tuple(sorted({w for name in X11 for w in name.split()}))


def srgb_to_lab(rgb) -> np.ndarray:
    """CIELAB (D65) of sRGB colours given as 0..255 values in the last axis."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def delta_e(rgb_a, rgb_b) -> np.ndarray:
    """CIEDE2000 colour difference between sRGB colours (0..255, last axis; broadcasts)."""
    return delta_e_lab(srgb_to_lab(rgb_a), srgb_to_lab(rgb_b))


def delta_e_lab(lab_a, lab_b) -> np.ndarray:
    """CIEDE2000 between CIELAB colours (last axis L, a, b)."""
    L1, a1, b1 = np.moveaxis(np.asarray(lab_a, dtype=np.float64), -1, 0)
    L2, a2, b2 = np.moveaxis(np.asarray(lab_b, dtype=np.float64), -1, 0)
    c_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_bar ** 7 / (c_bar ** 7 + 25.0 ** 7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p, h2p = np.degrees(np.arctan2(b1, a1p)) % 360, np.degrees(np.arctan2(b2, a2p)) % 360
    dLp, dCp = L2 - L1, c2p - c1p
    dh = h2p - h1p
    dh = np.where(c1p * c2p == 0, 0, np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh)))
    dHp = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    Lbp, Cbp = (L1 + L2) / 2, (c1p + c2p) / 2
    hsum = h1p + h2p
    wrapped = np.where(hsum < 360, (hsum + 360) / 2, (hsum - 360) / 2)
    hbp = np.where(c1p * c2p == 0, hsum, np.where(np.abs(h1p - h2p) <= 180, hsum / 2, wrapped))
    t = (1 - 0.17 * np.cos(np.radians(hbp - 30)) + 0.24 * np.cos(np.radians(2 * hbp))
         + 0.32 * np.cos(np.radians(3 * hbp + 6)) - 0.20 * np.cos(np.radians(4 * hbp - 63)))
    d_theta = 30 * np.exp(-(((hbp - 275) / 25) ** 2))
    rc = 2 * np.sqrt(Cbp ** 7 / (Cbp ** 7 + 25.0 ** 7))
    sl = 1 + 0.015 * (Lbp - 50) ** 2 / np.sqrt(20 + (Lbp - 50) ** 2)
    sc, sh = 1 + 0.045 * Cbp, 1 + 0.015 * Cbp * t
    rt = -np.sin(np.radians(2 * d_theta)) * rc
    return np.sqrt((dLp / sl) ** 2 + (dCp / sc) ** 2 + (dHp / sh) ** 2 + rt * (dCp / sc) * (dHp / sh))


_X11_RGB = np.array(list(X11.values()), dtype=np.float64)


def nearest_x11(rgb) -> str:
    """The X11 name perceptually nearest to ``rgb`` (CIEDE2000)."""
    return X11_NAMES[int(np.argmin(delta_e(np.asarray(rgb, dtype=np.float64)[None], _X11_RGB)))]
