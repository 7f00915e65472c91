"""Collect the JSON files bench/gpu.sh wrote into one markdown table (flattened key: value)."""

import json
import sys
from pathlib import Path


def flatten(prefix: str, value, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            flatten(f"{prefix}[{i}]", v, out)
    elif isinstance(value, float):
        out.append((prefix, f"{value:.4g}"))
    else:
        out.append((prefix, str(value)[:120]))


def main(folder: str) -> None:
    root = Path(folder)
    device = (root / "device.txt").read_text().strip() if (root / "device.txt").exists() else "?"
    print(f"device: {device}\n")
    runs = root / "gpu_runs.md"
    if runs.exists():
        print("| benchmark | exit | time | log |\n|---|---|---|---|")
        print(runs.read_text().rstrip() + "\n")
    for path in sorted(root.glob("gpu_*.json")):
        rows: list[tuple[str, str]] = []
        try:
            flatten("", json.loads(path.read_text()), rows)
        except ValueError as e:
            print(f"{path.name}: unreadable ({e})\n")
            continue
        print(f"### {path.stem}\n\n| figure | value |\n|---|---|")
        for k, v in rows:
            print(f"| {k} | {v} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/out")
