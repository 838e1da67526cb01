"""Issue 28, item 6: do the ControlNets trained on the first embedded base still work on the second?

    .venv/bin/python studies/nets_on_new_base.py --new data/tiny-sd-v2 [--old data/tiny-sd-v1] [--n 64]
        [--out reports/nets-on-new-base]

The paper's claim (section 3.5 and Fig. 12 of the appendix): a ControlNet trained on one base works on bases
fine-tuned from it. The second base continues the first (its UNet and VAE, its latents of the old worlds held in
place), so each net shipped in ``data/controlnets`` is measured on both bases exactly as its card measures it (the
same held-out conditions, seeds, prompt and CFG placement: ``cnkit.experiments.shipped.SHIPPED``), and on the old
base the card's own number must come back. Writes ``result.json`` and ``result.md`` (a table) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cnkit.card import card_data
from cnkit.experiments.evaluations import evaluate_controlnet
from cnkit.experiments.shipped import OUT, SHIPPED
from cnkit.models.bases import load_pipeline


def measure(old: str, new: str, n: int) -> list[dict]:
    bases = {"old": load_pipeline(old), "new": load_pipeline(new)}
    rows = []
    for name, spec in SHIPPED.items():
        folder = OUT / name
        ev = spec["eval"]
        row = {"net": name, "metric": ev["metric"], "bar": ev["bar"],
               "card": card_data(folder)["evaluation"][ev["metric"]]}
        for which, pipe in bases.items():
            m = evaluate_controlnet(pipe, str(folder), ev["dataset"], n=n, prompt=ev["prompt"],
                                    cfg_weighting=ev.get("cfg_weighting"))
            row[which] = m[ev["metric"]]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="data/tiny-sd-v1")
    ap.add_argument("--new", required=True)
    ap.add_argument("--n", type=int, default=64, help="held-out conditions per net (the cards use 64)")
    ap.add_argument("--out", default="reports/nets-on-new-base")
    args = ap.parse_args(argv)
    rows = measure(args.old, args.new, args.n)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"old": args.old, "new": args.new, "n": args.n, "rows": rows},
                                                indent=1))
    lines = [f"| net | metric | card (old base) | old base, now | new base ({Path(args.new).name}) | bar |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['net']} | {r['metric']} | {r['card']:.3f} | {r['old']:.3f} | {r['new']:.3f} | {r['bar']} |"
              for r in rows]
    (out / "result.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
