"""Print one markdown table of the headline numbers of every bench_*.json in a gpu_check output folder.

    python bench/gpu_table.py OUTDIR
Each benchmark's last stdout line is a JSON object; numeric leaves whose key names a time, a rate, a memory
size or a ratio are listed, one row per leaf, grouped by benchmark; so are sweep points, and the error or
failed capture that left a case without a number.
"""
import json
import re
import sys
from pathlib import Path

KEEP = re.compile(r"(ms|_us|us$|GiB|TFLOP|gbps|GBps|TBps|speedup|fraction|ratio|per_frame|max_abs|_diff|_s$|_s\.|"
                  r"per_s|sweep|mfu|share|spread|calls)", re.I)


def leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, obj
    elif isinstance(obj, str) and ("sweep" in prefix or "error" in prefix or "failed" in prefix):
        yield prefix, obj  # why a sweep point or a case has no number


def main(out: str) -> None:
    env = Path(out, "env.txt")
    if env.exists():
        print("```\n" + env.read_text().strip() + "\n```\n")
    print("| benchmark | metric | value |\n|---|---|---|")
    for p in sorted(Path(out).glob("bench_*.json")):
        try:
            data = json.loads(p.read_text())
        except ValueError:
            print(f"| {p.stem} | (no JSON: see {p.stem}.log) | |")
            continue
        for key, value in leaves(data):
            if isinstance(value, str) or KEEP.search(key.rsplit(".", 1)[-1]) or KEEP.search(key):
                shown = value[:120].replace("|", "/") if isinstance(value, str) else f"{value:.4g}"
                print(f"| {p.stem} | {key} | {shown} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu_check")
