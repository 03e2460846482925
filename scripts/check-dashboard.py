#!/usr/bin/env python3
"""Checks a Grafana dashboard's JSON before it is imported.

    scripts/check-dashboard.py [--exprs] DASHBOARD.json

Checks: valid JSON; `schemaVersion` >= 36, `title` and `uid` set; `templating.list` holds a
`datasource` variable of type `datasource` for `prometheus`; every panel, those inside a
row's `panels` included, has a unique integer `id` and a `gridPos`; every panel but a row
reads the `${datasource}` variable and has targets, each with an `expr` and a unique
`refId`. Any failure is printed with the panel it concerns and the exit status is 1.

With --exprs, once the checks pass, prints a JSON list of every query: panel targets as
{"panel", "refId", "expr"}, annotation queries with `annotation: NAME` as panel and no refId.
"""

import json
import sys

MIN_SCHEMA = 36
GRID_KEYS = ("h", "w", "x", "y")


def uses_variable(datasource):
    """Whether a panel or target datasource refers to the `datasource` variable."""
    if isinstance(datasource, str):
        return datasource in ("${datasource}", "$datasource")
    if isinstance(datasource, dict):
        return datasource.get("uid") in ("${datasource}", "$datasource")
    return False


def all_panels(panels):
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels") or [])


def check(dashboard):
    problems = []
    if not isinstance(dashboard, dict):
        return ["the document is not a JSON object"]
    schema = dashboard.get("schemaVersion")
    if not isinstance(schema, int) or schema < MIN_SCHEMA:
        problems.append(f"schemaVersion must be an integer >= {MIN_SCHEMA}, found {schema!r}")
    for key in ("title", "uid"):
        if not isinstance(dashboard.get(key), str) or not dashboard[key]:
            problems.append(f"`{key}` is missing or empty")

    variables = (dashboard.get("templating") or {}).get("list") or []
    source = [v for v in variables if v.get("name") == "datasource"]
    if not source:
        problems.append("templating.list has no `datasource` variable")
    elif source[0].get("type") != "datasource" or source[0].get("query") != "prometheus":
        problems.append("the `datasource` variable must have type `datasource` and query `prometheus`")

    seen = {}
    for panel in all_panels(dashboard.get("panels") or []):
        name = f"panel {panel.get('title')!r} (id {panel.get('id')!r})"
        pid = panel.get("id")
        if not isinstance(pid, int) or isinstance(pid, bool):
            problems.append(f"{name}: `id` must be an integer")
        elif pid in seen:
            problems.append(f"{name}: id {pid} is also used by panel {seen[pid]!r}")
        else:
            seen[pid] = panel.get("title")
        grid = panel.get("gridPos")
        if not isinstance(grid, dict) or any(not isinstance(grid.get(k), int) for k in GRID_KEYS):
            problems.append(f"{name}: `gridPos` needs integer h, w, x and y")
        if panel.get("type") == "row":
            continue
        if not uses_variable(panel.get("datasource")):
            problems.append(f"{name}: `datasource` must reference ${{datasource}}")
        targets = panel.get("targets")
        if not isinstance(targets, list) or not targets:
            problems.append(f"{name}: no targets")
            continue
        refs = set()
        for i, target in enumerate(targets):
            ref = target.get("refId")
            if not isinstance(ref, str) or not ref:
                problems.append(f"{name}: target {i} has no `refId`")
            elif ref in refs:
                problems.append(f"{name}: refId {ref} is used twice")
            refs.add(ref)
            if not isinstance(target.get("expr"), str) or not target["expr"].strip():
                problems.append(f"{name}: target {ref or i} has no `expr`")
            if "datasource" in target and not uses_variable(target["datasource"]):
                problems.append(f"{name}: target {ref or i}: `datasource` must reference ${{datasource}}")
    return problems


def queries(dashboard):
    out = []
    for panel in all_panels(dashboard.get("panels") or []):
        for target in panel.get("targets") or []:
            out.append({"panel": panel.get("title"), "refId": target.get("refId"), "expr": target.get("expr")})
    for annotation in (dashboard.get("annotations") or {}).get("list") or []:
        if annotation.get("expr"):
            out.append({"panel": f"annotation: {annotation.get('name')}", "refId": None,
                        "expr": annotation["expr"]})
    return out


def main(argv):
    args = [a for a in argv if a != "--exprs"]
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    path = args[0]
    try:
        with open(path, encoding="utf-8") as f:
            dashboard = json.load(f)
    except (OSError, ValueError) as e:
        print(f"{path}: not valid JSON: {e}", file=sys.stderr)
        return 1
    problems = check(dashboard)
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    if problems:
        return 1
    if "--exprs" in argv:
        json.dump(queries(dashboard), sys.stdout, indent=1)
        print()
    else:
        count = sum(1 for p in all_panels(dashboard["panels"]) if p.get("type") != "row")
        print(f"{path}: {count} panels, {len(queries(dashboard))} queries: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
