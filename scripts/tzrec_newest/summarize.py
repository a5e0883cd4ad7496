"""One line per test id from a junit xml: status, whether it doesn't count, first failure line.

A test "doesn't count" (NC) when it reads TorchEasyRec private attributes of a non-test object
(``manager._finalizer`` ...) or uses ``_policy_manager`` (which mocks ``mgr.save``).
"""

import ast
import sys
import xml.etree.ElementTree as ET

junit, test_file = sys.argv[1], sys.argv[2]

flags = {}
with open(test_file) as _f:
    _tree = ast.parse(_f.read())
for node in ast.walk(_tree):
    if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
        private, mocks = set(), False
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and sub.attr.startswith("_") and not sub.attr.startswith("__"):
                if isinstance(sub.value, ast.Name) and sub.value.id == "self":
                    mocks |= sub.attr == "_policy_manager"
                else:
                    private.add(sub.attr)
        flags[node.name] = (sorted(private), mocks)

rows = {}
for case in ET.parse(junit).getroot().iter("testcase"):
    name = case.get("name")
    tid = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{name}"
    status, msg = "PASS", ""
    for tag in ("failure", "error", "skipped"):
        el = case.find(tag)
        if el is not None:
            status = {"failure": "FAIL", "error": "ERROR", "skipped": "SKIP"}[tag]
            lines = (el.get("message") or el.text or "").strip().splitlines()
            msg = lines[0][:200] if lines else ""
            break
    prev = rows.get(tid)
    if prev and prev[0] != "PASS":  # a teardown error after a failure: keep the first, note it
        if status != "PASS":
            rows[tid] = (prev[0], prev[1] + f" [+ teardown {status}: {msg[:80]}]")
        continue
    rows[tid] = (status, msg)

counts = {}
for tid, (status, msg) in rows.items():
    base = tid.split("::")[1]
    private, mocks = next((v for k, v in flags.items() if base == k or base.startswith(k + "_")), ([], False))
    nc = []
    if private:
        nc.append("private:" + ",".join(private))
    if mocks:
        nc.append("mocks mgr.save")
    counts[status] = counts.get(status, 0) + 1
    print(f"{status:5} {tid}  {'(NC ' + '; '.join(nc) + ') ' if nc else ''}{msg}")
print(counts, "test ids", len(rows))
