#!/usr/bin/env python3
"""Structural check of the Rust crates' imports.

1. Inside each crate, no module uses one that uses it back, directly or
   through others (a cycle in the graph of `crate::`/`super::` paths in
   code; comments, doc links and `#[cfg(test)]` modules do not count).
2. Between crates, imports go one way: each crate may use only the crates
   listed for it below (dev-dependencies of tests are not checked here).

Exits 1 with each cycle or forbidden use named; prints the graph with -v.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "native")
# Which workspace crates each crate's library code may use.
ALLOWED = {
    "macula_relay_proto": set(),
    "macula_dist_quic": {"macula_relay_proto"},
    "macula_dist_node": {"macula_relay_proto", "macula_dist_quic"},
    "macula_dist_relay": {"macula_relay_proto", "macula_dist_quic"},
    "macula_dist_nif": {"macula_relay_proto", "macula_dist_quic", "macula_dist_node", "macula_dist_relay"},
    "macula_impair": set(),
}
PATH = re.compile(r"\b(crate|super)((?:::[a-z_][a-z0-9_]*)+)(?:::\{([^}]*)\})?|\b(crate|super)::\{([^}]*)\}")
CRATE_USE = re.compile(r"\b(macula_[a-z_]+)::")


def code_of(text):
    """The text without comments, string literals and test modules."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    cut = re.search(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)
    return text[: cut.start()] if cut else text


def modules(src):
    """Module name (path under src, `a::b`) -> file, for a crate's src."""
    out = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs") or dirpath.endswith("/bin"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)[:-3]
            parts = rel.split(os.sep)
            if parts[-1] in ("lib", "main", "mod"):
                parts = parts[:-1]
            out["::".join(parts)] = os.path.join(dirpath, f)
    return out


def edges(mods):
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        code = code_of(open(path).read())
        parent = m.rsplit("::", 1)[0] if "::" in m else ""
        for match in PATH.finditer(code):
            kind = match.group(1) or match.group(4)
            if match.group(2):
                prefix = match.group(2)[2:]
                group = match.group(3)
                names = [prefix] + [
                    f"{prefix}::{n.strip()}" for n in (group or "").split(",") if n.strip()
                ]
            else:
                names = [n.strip() for n in match.group(5).split(",") if n.strip()]
            base = "" if kind == "crate" else parent
            for name in names:
                name = re.sub(r"\s+", "", name).split("{")[0].rstrip(":")
                target = f"{base}::{name}" if base else name
                # Walk down to the deepest module the path names.
                while target not in mods and "::" in target:
                    target = target.rsplit("::", 1)[0]
                if target in mods and target != m and not m.startswith(target + "::") \
                        and not target.startswith(m + "::") and target != "":
                    graph[m].add(target)
    return graph


def cycles(graph):
    found, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def main():
    verbose = "-v" in sys.argv
    bad = 0
    for crate, allowed in ALLOWED.items():
        src = os.path.join(ROOT, crate, "src")
        mods = modules(src)
        graph = edges(mods)
        if verbose:
            for m in sorted(graph):
                print(f"{crate}::{m or '(root)'} -> {', '.join(sorted(graph[m])) or '-'}")
        for cycle in cycles(graph):
            print(f"{crate}: import cycle: {' -> '.join(cycle)}")
            bad += 1
        for m, path in mods.items():
            for used in set(CRATE_USE.findall(code_of(open(path).read()))):
                if used != crate and used in ALLOWED and used not in allowed:
                    print(f"{crate}::{m}: uses {used}, which it may not")
                    bad += 1
    if bad:
        sys.exit(1)
    print("imports: no cycles, crates import one way")


if __name__ == "__main__":
    main()
