"""``drdm weights``: list the bundled and user weights with their provenance."""
from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser("weights", help="list available weights and how they were trained")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def run(args) -> int:
    from ..core.config import KEEP_SIZE_INFLATION
    from ..weights import list_weights
    items = list_weights()
    if args.json:
        print(json.dumps(items, indent=2, sort_keys=True))
        return 0
    if not items:
        print("no weights bundled; pass a checkpoint file to --weights")
        return 0
    for e in items:
        where = "bundled" if e.get("bundled") else "user"
        mark = f"  [default {e['default_for_ndim']}D]" if e.get("default_for_ndim") else ""
        print(f"{e['name']:<12} {e.get('ndim', '?')}D S={e.get('size', '?'):<4} {where:<8} {e['path']}{mark}")
        if e.get("aliases"):
            print(f"    aliases: {', '.join(e['aliases'])}")
        if e.get("description"):
            print(f"    {e['description']}")
        inf = e.get("inference")
        if inf:
            margin, fit = inf["background_margin"], inf.get("anatomy_fit")
            extra = f" started {inf['loop_extra']} steps above T'" if inf.get("loop_extra") and inf["schedule"] == "paper" else ""
            print(f"    generates with: {inf['schedule']} loop{extra}, K={inf['k_recursions']}, composition padding "
                  f"{inf['compose_padding']}, input padding {inf['input_padding']} px, background margin "
                  + ("off" if margin is None else f"{margin} px")
                  + ", view " + ("the whole image" if fit is None else f"fitted to the anatomy ({fit} px around it)")
                  + (", the anatomy's size kept (global zoom removed"
                     + (" where it was enlarged)" if inf.get("keep_size") == KEEP_SIZE_INFLATION else ")")
                     if inf.get("keep_size") else ""))
        prov = e.get("provenance") or {}
        for key in ("trained_on", "steps", "wall_time_h", "device", "command", "data_sha256"):
            if key in prov:
                val = prov[key]
                if isinstance(val, (dict, list)):
                    val = json.dumps(val)
                print(f"    {key}: {val}")
        if e.get("sha256"):
            print(f"    sha256: {e['sha256']}")
    return 0
