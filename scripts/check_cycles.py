#!/usr/bin/env python3
"""Fails when two modules of the crate depend on each other, directly or through others.

A module is a file under src/ (`fleet`, `autoscale::policy`, `platform::local`, ...). It depends
on another when its code (comments and its `#[cfg(test)] mod tests` left out) names it:
`crate::other::...`, `use crate::{other, ...}` or `super::other`. A module and its own
submodules (`platform` and `platform::local`) are one family and may name each other. Prints
every cycle with the references that close it, and exits 1 if there is one.
Usage: scripts/check_cycles.py [SRC_DIR]
"""
import os
import re
import sys


def modules(root):
    found = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".rs"):
                path = os.path.join(folder, f)
                parts = os.path.relpath(path, root)[:-3].split(os.sep)
                if parts[-1] in ("mod", "lib", "main"):
                    parts = parts[:-1]
                found["::".join(parts)] = path
    return found


def code_of(path):
    text = open(path, encoding="utf-8").read()
    tests = text.find("#[cfg(test)]\nmod tests")
    if tests >= 0:
        text = text[:tests]
    return re.sub(r"//[^\n]*", "", text)


def named(module, text, known):
    """The modules `text` (the code of `module`) refers to."""
    refs = set()
    for path in re.findall(r"crate::([a-z_]+(?:::[a-z_]+)*)", text):
        segs = path.split("::")
        for k in range(len(segs), 0, -1):
            if "::".join(segs[:k]) in known:
                refs.add("::".join(segs[:k]))
                break
    for group in re.findall(r"use crate::\{([^}]*)\}", text):
        for item in group.split(","):
            head = item.strip().split("::")[0]
            if head in known:
                refs.add(head)
    parent = "::".join(module.split("::")[:-1])
    for name in re.findall(r"super::([a-z_]+)", text):
        sibling = f"{parent}::{name}" if parent else name
        refs.add(sibling if sibling in known else parent)
    refs.discard(module)
    refs.discard("")
    return refs


def related(a, b):
    return a.startswith(b + "::") or b.startswith(a + "::")


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "src")
    mods = modules(root)
    graph = {
        m: {r for r in named(m, code_of(p), mods) if not related(m, r)} for m, p in mods.items()
    }
    found = cycles(graph)
    for component in found:
        print("import cycle: " + ", ".join(component))
        for a in component:
            for b in sorted(graph[a] & set(component)):
                print(f"    {a} -> {b}")
    if found:
        sys.exit(1)
    print(f"no import cycle between the {len(mods)} modules")


if __name__ == "__main__":
    main()
