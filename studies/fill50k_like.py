"""Fill50K-format folders drawn independently of the kit's toy world (numpy and PIL only).

    python studies/fill50k_like.py OUT [--n 4000] [--size 64] [--seed 0] [--line-width 0] [--min-contrast 0]

Writes the layout of the official ControlNet tutorial's data (lllyasviel/ControlNet, docs/train.md):
``OUT/prompt.json`` in JSON lines ``{"source": "source/0.png", "target": "target/0.png", "prompt":
"pale golden rod circle with old lace background"}``, ``OUT/source/<i>.png`` (a circle's outline, white
on black) and ``OUT/target/<i>.png`` (the filled circle in one colour on a background of another), plus
``OUT/truth.jsonl`` (centre, radius, colour names and RGB of each item) for metrics; readers of the
official format ignore it. Nothing here imports the kit: this is data the kit did not make.

What is copied from Fill50K and how it was found (its generator was never published):

- Prompts: "<fill> circle with <background> background", the 140 CSS/X11 colour names (``gray`` spellings,
  no ``grey`` duplicates, no ``rebeccapurple``) split into words the way Fill50K's ``prompt.json`` does:
  "pale golden rod", "light golden rod yellow", "honey dew", "fire brick", "corn silk", "burly wood",
  "olive drab", but "cornflower blue" (the 23 prompts shown in docs/train.md's screenshot
  github_page/t4.png, and "burly wood circle with orange background" in its text).
- Geometry, measured on 52 Fill50K sources at 512 px (github_page/t/ip.png: 4 at full size; t2.png: the
  first 48 as file-browser thumbnails), circle fits: radius / size from 0.13 to 0.50, quartiles 0.24,
  0.31, 0.41, as a uniform draw on [1/8, 1/2] gives (0.22, 0.31, 0.41); centre coordinate / size from
  0.19 to 0.80, quartiles 0.34, 0.50, 0.65, as uniform on [0.18, 0.80] gives. Circles may leave the
  frame (item 0 of ip.png does): nothing keeps them inside.
- The outline is binary (values 0 and 255 only, no anti-aliasing) and about 5 px wide at 512 px (radial
  width of all 4 full-size sources), so ``--line-width 0`` (the default) scales it: round(5 * size / 512),
  at least 1 (1 px at 64, 5 px at 512). The target is drawn without anti-aliasing too, disc = the pixels
  whose centre lies within the radius.
- The two colours are different names; Fill50K does not avoid close pairs ("papaya whip circle with corn
  silk background" is in its first 10 prompts), nor does this by default. Names with the same RGB
  (aqua/cyan, fuchsia/magenta) are never paired, since the disc would be invisible. ``--min-contrast D``
  redraws pairs closer than D in RGB distance (0 = Fill50K's behaviour).

Deterministic: item i depends only on (seed, i, size, line width, min contrast), so a longer folder begins
with the items of a shorter one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor

# CSS/X11 names as Fill50K's prompts split them. The joined name (the CSS keyword) is the key.
COLOUR_WORDS = {
    "aliceblue": "alice blue", "antiquewhite": "antique white", "aqua": "aqua", "aquamarine": "aquamarine",
    "azure": "azure", "beige": "beige", "bisque": "bisque", "black": "black", "blanchedalmond": "blanched almond",
    "blue": "blue", "blueviolet": "blue violet", "brown": "brown", "burlywood": "burly wood",
    "cadetblue": "cadet blue", "chartreuse": "chartreuse", "chocolate": "chocolate", "coral": "coral",
    "cornflowerblue": "cornflower blue", "cornsilk": "corn silk", "crimson": "crimson", "cyan": "cyan",
    "darkblue": "dark blue", "darkcyan": "dark cyan", "darkgoldenrod": "dark golden rod", "darkgray": "dark gray",
    "darkgreen": "dark green", "darkkhaki": "dark khaki", "darkmagenta": "dark magenta",
    "darkolivegreen": "dark olive green", "darkorange": "dark orange", "darkorchid": "dark orchid",
    "darkred": "dark red", "darksalmon": "dark salmon", "darkseagreen": "dark sea green",
    "darkslateblue": "dark slate blue", "darkslategray": "dark slate gray", "darkturquoise": "dark turquoise",
    "darkviolet": "dark violet", "deeppink": "deep pink", "deepskyblue": "deep sky blue", "dimgray": "dim gray",
    "dodgerblue": "dodger blue", "firebrick": "fire brick", "floralwhite": "floral white",
    "forestgreen": "forest green", "fuchsia": "fuchsia", "gainsboro": "gainsboro", "ghostwhite": "ghost white",
    "gold": "gold", "goldenrod": "golden rod", "gray": "gray", "green": "green", "greenyellow": "green yellow",
    "honeydew": "honey dew", "hotpink": "hot pink", "indianred": "indian red", "indigo": "indigo",
    "ivory": "ivory", "khaki": "khaki", "lavender": "lavender", "lavenderblush": "lavender blush",
    "lawngreen": "lawn green", "lemonchiffon": "lemon chiffon", "lightblue": "light blue",
    "lightcoral": "light coral", "lightcyan": "light cyan", "lightgoldenrodyellow": "light golden rod yellow",
    "lightgray": "light gray", "lightgreen": "light green", "lightpink": "light pink",
    "lightsalmon": "light salmon", "lightseagreen": "light sea green", "lightskyblue": "light sky blue",
    "lightslategray": "light slate gray", "lightsteelblue": "light steel blue", "lightyellow": "light yellow",
    "lime": "lime", "limegreen": "lime green", "linen": "linen", "magenta": "magenta", "maroon": "maroon",
    "mediumaquamarine": "medium aquamarine", "mediumblue": "medium blue", "mediumorchid": "medium orchid",
    "mediumpurple": "medium purple", "mediumseagreen": "medium sea green", "mediumslateblue": "medium slate blue",
    "mediumspringgreen": "medium spring green", "mediumturquoise": "medium turquoise",
    "mediumvioletred": "medium violet red", "midnightblue": "midnight blue", "mintcream": "mint cream",
    "mistyrose": "misty rose", "moccasin": "moccasin", "navajowhite": "navajo white", "navy": "navy",
    "oldlace": "old lace", "olive": "olive", "olivedrab": "olive drab", "orange": "orange",
    "orangered": "orange red", "orchid": "orchid", "palegoldenrod": "pale golden rod", "palegreen": "pale green",
    "paleturquoise": "pale turquoise", "palevioletred": "pale violet red", "papayawhip": "papaya whip",
    "peachpuff": "peach puff", "peru": "peru", "pink": "pink", "plum": "plum", "powderblue": "powder blue",
    "purple": "purple", "red": "red", "rosybrown": "rosy brown", "royalblue": "royal blue",
    "saddlebrown": "saddle brown", "salmon": "salmon", "sandybrown": "sandy brown", "seagreen": "sea green",
    "seashell": "sea shell", "sienna": "sienna", "silver": "silver", "skyblue": "sky blue",
    "slateblue": "slate blue", "slategray": "slate gray", "snow": "snow", "springgreen": "spring green",
    "steelblue": "steel blue", "tan": "tan", "teal": "teal", "thistle": "thistle", "tomato": "tomato",
    "turquoise": "turquoise", "violet": "violet", "wheat": "wheat", "white": "white", "whitesmoke": "white smoke",
    "yellow": "yellow", "yellowgreen": "yellow green",
}
NAMES = tuple(COLOUR_WORDS)  # CSS keywords, in a fixed order
RGB = {name: ImageColor.getrgb(name) for name in NAMES}
# Fill50K's geometry as fractions of the image side (see the module docstring for how they were measured).
RADIUS_RANGE = (1 / 8, 1 / 2)
CENTRE_RANGE = (0.18, 0.80)
LINE_WIDTH_AT_512 = 5


def default_line_width(size: int) -> int:
    return max(1, round(LINE_WIDTH_AT_512 * size / 512))


def _contrast(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(RGB[a], RGB[b], dtype=np.float64)))


def item(i: int, seed: int = 0, size: int = 64, line_width: int = 0, min_contrast: float = 0.0):
    """(source, target, prompt, truth) of item ``i``: uint8 HxWx3 arrays, a string and a dict."""
    rng = np.random.default_rng([seed, i])
    width = line_width or default_line_width(size)
    cx, cy = rng.uniform(*CENTRE_RANGE, size=2) * size
    r = rng.uniform(*RADIUS_RANGE) * size
    while True:
        fill, background = (NAMES[k] for k in rng.choice(len(NAMES), size=2, replace=False))
        c = _contrast(fill, background)
        if c > 0 and c >= min_contrast:
            break
    y, x = np.mgrid[:size, :size].astype(np.float64)
    d = np.hypot(x - cx, y - cy)  # pixel centres at integer coordinates
    source = np.zeros((size, size, 3), np.uint8)
    source[np.abs(d - r) <= width / 2] = 255
    target = np.empty((size, size, 3), np.uint8)
    target[:] = RGB[background]
    target[d <= r] = RGB[fill]
    prompt = f"{COLOUR_WORDS[fill]} circle with {COLOUR_WORDS[background]} background"
    truth = {"index": i, "centre": [float(cx), float(cy)], "radius": float(r), "fill": fill,
             "background": background, "fill_rgb": list(RGB[fill]), "background_rgb": list(RGB[background]),
             "line_width": width, "size": size,
             "inside": bool(r <= min(cx, cy, size - 1 - cx, size - 1 - cy))}
    return source, target, prompt, truth


def truth_disc(truth: dict) -> np.ndarray:
    """The filled disc of a ``truth.jsonl`` row as a boolean mask (what the target's fill covers)."""
    size = truth["size"]
    y, x = np.mgrid[:size, :size].astype(np.float64)
    (cx, cy), r = truth["centre"], truth["radius"]
    return np.hypot(x - cx, y - cy) <= r


def write(out, n: int = 4000, size: int = 64, seed: int = 0, line_width: int = 0, min_contrast: float = 0.0) -> Path:
    """Write ``n`` items into folder ``out`` (see the module docstring); returns the folder."""
    out = Path(out)
    (out / "source").mkdir(parents=True, exist_ok=True)
    (out / "target").mkdir(parents=True, exist_ok=True)
    with open(out / "prompt.json", "w") as prompts, open(out / "truth.jsonl", "w") as truths:
        for i in range(n):
            source, target, prompt, truth = item(i, seed, size, line_width, min_contrast)
            Image.fromarray(source).save(out / "source" / f"{i}.png")
            Image.fromarray(target).save(out / "target" / f"{i}.png")
            prompts.write(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": prompt})
                          + "\n")
            truths.write(json.dumps(truth) + "\n")
    return out


def read_truth(folder) -> list[dict]:
    with open(Path(folder) / "truth.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write (created)")
    ap.add_argument("--n", type=int, default=4000, help="items")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (Fill50K: 512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--line-width", type=int, default=0, help="outline width in px; 0: round(5 * size / 512), >= 1")
    ap.add_argument("--min-contrast", type=float, default=0.0,
                    help="least RGB distance between fill and background (0: as Fill50K, any two colours)")
    args = ap.parse_args(argv)
    if args.n < 1 or args.size < 8 or args.line_width < 0:
        ap.error("need --n >= 1, --size >= 8 and --line-width >= 0")
    out = write(args.out, args.n, args.size, args.seed, args.line_width, args.min_contrast)
    print(f"wrote {args.n} items ({args.size} px, line width {args.line_width or default_line_width(args.size)} px) "
          f"to {out}")


if __name__ == "__main__":
    main()
