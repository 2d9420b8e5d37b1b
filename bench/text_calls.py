#!/usr/bin/env python3
"""Cost per character of reading tool calls written as text, on adversarial replies.

    python3 bench/text_calls.py                          # the current simple_api_proxy.py
    python3 bench/text_calls.py --against HEAD~5         # and an earlier commit, measured the same way
    python3 bench/text_calls.py --sizes 1000,1000000 --budget 2

A model that falls into a run of whitespace, an unclosed fence or thousands of tags (or a prompt
injection that asks for them) must cost the proxy time in proportion to the reply's length: the
parse holds the interpreter lock, so a quadratic one stalls every other client.

For each family of adversarial text and each size, two figures, in µs per 1,000 characters:
- parse: find_text_tool_calls() on the whole reply, as a reply nobody streams is read;
- stream: the reply through a StreamTranslator with tools offered, in pieces of 40 characters (one
  Ollama token each), then the final chunk, as a streamed reply is read.
Each figure is the lowest of --repeat rounds. A size whose first round takes longer than --budget
seconds is reported as "over budget" and the larger sizes of that family are skipped.
Linear code shows the same figure (within noise) from 1 KB to 1 MB; the closing line gives, per
version, the largest ratio of a family's 1 MB figure to its 1 KB figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from hot_path import load_module  # noqa: E402
from run import materialize_baseline, release_label  # noqa: E402
TOOLS = {"Read": {"type": "object", "properties": {"file_path": {"type": "string"}, "limit": {"type": "integer"}}},
         "Bash": {"type": "object", "properties": {"command": {"type": "string"}}}}
CALL = '{"name": "Read", "arguments": {"file_path": "/a"}}'
PIECE = 40


def repeat_to(unit, size, head="", tail=""):
    body = unit * max(1, (size - len(head) - len(tail)) // len(unit))
    return head + body + tail


FAMILIES = {
    "fence, then spaces": lambda n: repeat_to(" ", n, "```\n"),
    "fence, spaces, half a close": lambda n: repeat_to(" ", n, "```json\n", "\n``"),
    "unclosed fence of JSON lines": lambda n: repeat_to('{"a": 1}\n', n, "```json\n"),
    "newlines only": lambda n: repeat_to("\n", n),
    "tagged calls, thousands": lambda n: repeat_to("<tool_call>" + CALL + "</tool_call>\n", n),
    "python tags, thousands": lambda n: repeat_to("<|python_tag|>" + CALL + "<|eom_id|>", n),
    "python tag, calls by ;": lambda n: repeat_to(CALL + ";", n, "<|python_tag|>"),
    "unclosed tool_call tags": lambda n: repeat_to("<tool_call>\n", n),
    "qwen parameters, unclosed": lambda n: repeat_to("<parameter=file_path>\n", n, "<function=Read>\n"),
    "invoke parameters, unclosed": lambda n: repeat_to('<parameter name="a">', n,
                                                       '<function_calls>\n<invoke name="Read">'),
    "deep brackets": lambda n: repeat_to("[", n),
    "deep objects": lambda n: repeat_to('{"a": ', n),
    "mistral, deep": lambda n: repeat_to("[", n, "[TOOL_CALLS]"),
    "gemma, deep": lambda n: repeat_to("a:{", n, "<|tool_call>call:Read{"),
    "prose lines, then a tag": lambda n: repeat_to("word word\n", n, "", "<tool_call>" + CALL),
    "a line, then blank lines": lambda n: repeat_to("\n", n, "Let me check.\n"),
    "a word, then spaces": lambda n: repeat_to(" ", n, "Hi"),
}


def parse_once(proxy, text):
    started = time.perf_counter()
    proxy.find_text_tool_calls(text, TOOLS)
    return time.perf_counter() - started


def stream_once(proxy, text):
    chunks = [{"model": "m", "message": {"role": "assistant", "content": text[at:at + PIECE]}, "done": False}
              for at in range(0, len(text), PIECE)]
    chunks.append({"model": "m", "message": {"role": "assistant", "content": ""}, "done": True,
                   "done_reason": "stop", "prompt_eval_count": 1, "eval_count": len(chunks)})
    translator = proxy.StreamTranslator("m", 1, tool_names=TOOLS)
    started = time.perf_counter()
    for chunk in chunks:
        translator.feed(chunk)
    return time.perf_counter() - started


def measure(proxy, sizes, repeat, budget):
    """{(family, kind): {size: µs per 1,000 characters, or None when over budget}}."""
    results = {}
    for family, make in FAMILIES.items():
        for kind, run in (("parse", parse_once), ("stream", stream_once)):
            row = results[(family, kind)] = {}
            for size in sizes:
                text = make(size)
                first = run(proxy, text)
                if first > budget:
                    row[size] = None
                    break
                rounds = [first] + [run(proxy, text) for _ in range(repeat - 1)]
                row[size] = min(rounds) / len(text) * 1e9  # µs per 1,000 characters
    return results


def worst_growth(results, sizes):
    """The largest last-size / first-size ratio over the families (inf where a size ran over)."""
    ratios = []
    for row in results.values():
        first, last = row.get(sizes[0]), row.get(sizes[-1])
        ratios.append(float("inf") if not first or last is None else last / first)
    return max(ratios), statistics.median(ratios)


def version_of(revision):
    if revision is None:
        return ROOT / "simple_api_proxy.py"
    return materialize_baseline(revision, tempfile.mkdtemp(prefix="text_calls_"))


def print_table(label, results, sizes):
    print("\n%s: µs per 1,000 characters (lowest of the rounds)" % label)
    print("%-32s %-6s" % ("family", "kind") + "".join("%12s" % format_size(size) for size in sizes))
    for (family, kind), row in results.items():
        cells = ["over budget" if row.get(size, 0) is None else ("" if size not in row else "%.1f" % row[size])
                 for size in sizes]
        print("%-32s %-6s" % (family, kind) + "".join("%12s" % cell for cell in cells))


def format_size(size):
    return "%d KB" % (size // 1000) if size < 1000000 else "%d MB" % (size // 1000000)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", help="a release (1.0.0) or git revision to measure too")
    parser.add_argument("--sizes", default="1000,10000,100000,1000000", help="reply sizes in characters")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per figure (the lowest is kept)")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds one run may take before a family stops")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON as well")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    versions = [("current", None)] + ([(release_label(args.against), args.against)] if args.against else [])
    summary, everything = [], {}
    for label, revision in versions:
        proxy = load_module(version_of(revision), "proxy_%d" % len(summary))
        results = measure(proxy, sizes, args.repeat, args.budget)
        print_table(label, results, sizes)
        worst, median = worst_growth(results, sizes)
        summary.append((label, worst, median))
        everything[label] = {"%s | %s" % key: row for key, row in results.items()}
    print()
    for label, worst, median in summary:
        print("%s: %s / %s cost per character, worst family %.1fx, median %.2fx"
              % (label, format_size(sizes[-1]), format_size(sizes[0]), worst, median))
    if args.json:
        print(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
