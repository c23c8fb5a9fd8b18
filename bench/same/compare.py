"""Compare two report.json files field by field (numbers exactly; timings and paths aside).

Used by bench/same/run.sh: prints each difference, then "compared".
"""

from __future__ import annotations

import json
import sys

SKIP = ("seconds", "images_per_second", "date", "out", "path", "timings")


def differences(x, y, path: str = "") -> list[str]:
    if isinstance(x, dict) and isinstance(y, dict):
        found = []
        for key in sorted(set(x) | set(y)):
            if any(word in key for word in SKIP):
                continue
            if key not in x or key not in y:
                found.append(f"only in one: {path}/{key}")
            else:
                found += differences(x[key], y[key], f"{path}/{key}")
        return found
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return [d for i, (u, v) in enumerate(zip(x, y)) for d in differences(u, v, f"{path}[{i}]")]
    return [] if x == y else [f"differs: {path}: {x!r} vs {y!r}"]


if __name__ == "__main__":
    before, after = (json.loads(open(name).read()) for name in sys.argv[1:3])
    for line in differences(before, after):
        print(line)
    print("compared")
