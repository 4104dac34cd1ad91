"""ADE20K SceneParsing (150 classes) metadata: class names in label order (label 1..150 in the PNGs, 0..149
after reduce_zero_label) and the customary colour for each, as in the ADE20K benchmark tools (color150) and mmseg."""
from __future__ import annotations

from typing import List, Tuple

_NAMES = (
    "wall|building|sky|floor|tree|ceiling|road|bed|windowpane|grass|cabinet|sidewalk|person|earth|door|ta"
    "ble|mountain|plant|curtain|chair|car|water|painting|sofa|shelf|house|sea|mirror|rug|field|armchair|s"
    "eat|fence|desk|rock|wardrobe|lamp|bathtub|railing|cushion|base|box|column|signboard|chest of drawers"
    "|counter|sand|sink|skyscraper|fireplace|refrigerator|grandstand|path|stairs|runway|case|pool table|p"
    "illow|screen door|stairway|river|bridge|bookcase|blind|coffee table|toilet|flower|book|hill|bench|co"
    "untertop|stove|palm|kitchen island|computer|swivel chair|boat|bar|arcade machine|hovel|bus|towel|lig"
    "ht|truck|tower|chandelier|awning|streetlight|booth|television receiver|airplane|dirt track|apparel|p"
    "ole|land|bannister|escalator|ottoman|bottle|buffet|poster|stage|van|ship|fountain|conveyer belt|cano"
    "py|washer|plaything|swimming pool|stool|barrel|basket|waterfall|tent|bag|minibike|cradle|oven|ball|f"
    "ood|step|tank|trade name|microwave|pot|animal|bicycle|lake|dishwasher|screen|blanket|sculpture|hood|"
    "sconce|vase|traffic light|tray|ashcan|fan|pier|crt screen|plate|monitor|bulletin board|shower|radiat"
    "or|glass|clock|flag"
)
_PALETTE_HEX = (
    "787878b4787806e6e650323204c8037878508c8c8ccc05ffe6e6e604fa07e005ffebff0796053d78784608ff33ff06528fff8c"
    "ccff04ff3307cc46030066c83de6faff06330b66ffff0747ff09e00907e6dcdcdcff095c7009ff08ffd607ffe0ffb8060aff47"
    "ff290a07ffffe0ff086608ffff3d06ffc207ff7a0800ff14ff0829ff05990633ffeb0cffa0961400a3ff8c8c8cfa0a0f14ff00"
    "1fff00ff1f00ffe00099ff000000ffff470000ebff00adff1f00ff0bc8c8ff520000fff5003dff00ff7000ff85ff0000ffa300"
    "ff6600c2ff00008fff33ff000052ff00ff2900ffad0a00ffadff0000ff99ff5c00ff00ffff00f5ff0066ffad00ff0014ffb8b8"
    "001fff00ff3d0047ffff00cc00ffc200ff52000aff0070ff3300ff00c2ff007aff00ffa3ff990000ff0aff70008fff005200ff"
    "a3ff00ffeb0008b8aa8500ff00ff5cb800ffff001f00b8ff00d6ffff00705cff0000e0ff70e0ff46b8a0a300ff9900ff47ff00"
    "ff00a3ffcc00ff008f00ffeb85ff00ff00ebf500ffff007afff5000abed4d6ff0000ccff1400ffffff000099ff0029ff00ffcc"
    "2900ff29ff00ad00ff00f5ff4700ff7a00ff00ffb8005cffb8ff000085ffffd60019c2c266ff005c00ff"
)

ADE20K_CLASSES: Tuple[str, ...] = tuple(_NAMES.split("|"))
ADE20K_PALETTE: Tuple[Tuple[int, int, int], ...] = tuple(
    tuple(int(_PALETTE_HEX[i + j:i + j + 2], 16) for j in (0, 2, 4)) for i in range(0, len(_PALETTE_HEX), 6))
assert len(ADE20K_CLASSES) == len(ADE20K_PALETTE) == 150


def palette_for(num_classes: int) -> List[Tuple[int, int, int]]:
    """The ADE20K colours for the first ``num_classes`` classes, extended deterministically beyond 150."""
    colours = list(ADE20K_PALETTE[:num_classes])
    for i in range(len(colours), num_classes):
        colours.append(((i * 67) % 256, (i * 149) % 256, (i * 211) % 256))
    return colours
