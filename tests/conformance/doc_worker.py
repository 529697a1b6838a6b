#!/usr/bin/env python3
"""Runs the minimal worker printed in docs/protocol.md, section 9.

    python3 doc_worker.py PATH/TO/docs/protocol.md

Cuts the first ```python block after the "## 9." heading out of the page and
runs it as __main__, so that the conformance kit tests the code a reader
copies, not a copy of it. Needs the generated fdbroker.v1.handoff_pb2 on
PYTHONPATH, like the listing itself.
"""
import re
import sys


def extract(markdown: str) -> str:
    section = markdown.split("\n## 9.", 1)
    if len(section) != 2:
        sys.exit("doc_worker.py: no '## 9.' section in the page")
    block = re.search(r"```python\n(.*?)\n```", section[1], re.S)
    if block is None:
        sys.exit("doc_worker.py: no ```python block in section 9")
    return block.group(1)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as page:
        code = extract(page.read())
    sys.argv = ["worker.py"]
    exec(compile(code, "docs/protocol.md#9", "exec"), {"__name__": "__main__"})
