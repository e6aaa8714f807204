"""Fail if the Rust code can reach one of the PyO3 0.28 advisories that the pin carries.

    python3 scripts/check_advisories.py [ROOT]      (ROOT: the repository, by default this one)

* RUSTSEC-2026-0177: `PyCFunction::new_closure` lacks a `Sync` bound. Rule: the identifier
  `new_closure` appears nowhere in the Rust code.
* RUSTSEC-2026-0176 (GHSA-36hh-v3qg-5jq4): `nth` and `nth_back` of the PyList and PyTuple
  iterators compute `index + n` unchecked and read out of bounds when it wraps. The std
  adaptors reach them too: `Skip` calls `nth` on its first item, `StepBy` on every item
  after the first, `Rev` turns `nth` into `nth_back`, and `Take`, `Enumerate`, `Fuse`,
  `Peekable` and `Chain` forward `nth`. The receiver's type is not visible to a text scan,
  so the rule is conservative: the identifiers `nth`, `nth_back`, `skip` and `step_by` do not
  appear at all (a method call, a path such as `Iterator::nth`, a `use` rename). `last` and
  `count` are safe (PyO3 builds them on `next_back` and `len`) and stay allowed.
  Two exemptions, both visible in review: a receiver that is a literal integer range,
  `(0..n).step_by(2)`, and a line that ends with the comment `// advisories: <why>` saying
  why the receiver is not a Python list or tuple iterator.
* Crates built on PyO3 (numpy, pythonize, ...) are outside this scan, so Cargo.lock may name
  no crate that depends on `pyo3` except PyO3's own and this one.

Comments and string literals are blanked before the scan, so prose may name the methods.
Exit status 0: clean; 1: violations, one line each as `path:line: what (advisory)`.
"""

import re
import sys
import tomllib
from pathlib import Path

ADVISORY_CLOSURE = "RUSTSEC-2026-0177, PyCFunction::new_closure lacks a Sync bound"
ADVISORY_NTH = "RUSTSEC-2026-0176, out-of-bounds read in nth/nth_back of PyList/PyTuple iterators"

NTH_FAMILY = ("nth", "nth_back", "skip", "step_by")
FORBIDDEN = re.compile(r"\b(new_closure|nth|nth_back|skip|step_by)\b")
# `(0..10)`, `(1..=n)`, `(start..end)`: a range of integers is never a Python sequence.
RANGE_RECEIVER = re.compile(r"\(\s*[\w.]+\s*\.\.=?\s*[\w.]+\s*\)\s*\.\s*$")
EXEMPTION = re.compile(r"//\s*advisories:\s*\S")
RAW_STRING_START = re.compile(r'b?r(#*)"')
CHAR_LITERAL = re.compile(r"'(\\.[^']*|[^\\'])'")
# Directories that hold no source of this crate.
SKIPPED_DIRS = {"target", ".git"}


def blank_comments_and_strings(source: str) -> str:
    """`source` with the insides of comments and string/char literals turned into spaces,
    newlines kept, so that line numbers and columns stay as they were."""
    out = []
    i, n = 0, len(source)

    def blank(text: str) -> str:
        return re.sub(r"[^\n]", " ", text)

    while i < n:
        c = source[i]
        if source.startswith("//", i):
            end = source.find("\n", i)
            end = n if end == -1 else end
            out.append(blank(source[i:end]))
            i = end
        elif source.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if source.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif source.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(source[i:j]))
            i = j
        elif raw := RAW_STRING_START.match(source, i):
            if i and (source[i - 1].isalnum() or source[i - 1] == "_"):
                out.append(c)  # an identifier ending in `r` or `br`, not a raw string
                i += 1
                continue
            closing = '"' + raw.group(1)
            end = source.find(closing, raw.end())
            end = n if end == -1 else end + len(closing)
            out.append(blank(source[i:end]))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and source[j] != '"':
                j += 2 if source[j] == "\\" else 1
            out.append(blank(source[i : j + 1]))
            i = j + 1
        elif char := CHAR_LITERAL.match(source, i):
            out.append(blank(char.group(0)))  # a char literal; a lifetime has no closing quote
            i = char.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def scan_rust(path: Path, shown: str) -> list[str]:
    source = path.read_text(encoding="utf-8")
    original_lines = source.split("\n")
    code_lines = blank_comments_and_strings(source).split("\n")
    problems = []
    lines = zip(code_lines, original_lines, strict=True)
    for number, (code, original) in enumerate(lines, start=1):
        for match in FORBIDDEN.finditer(code):
            name = match.group(1)
            if name == "new_closure":
                problems.append(f"{shown}:{number}: uses `new_closure` ({ADVISORY_CLOSURE})")
                continue
            if RANGE_RECEIVER.search(code[: match.start()]) or EXEMPTION.search(original):
                continue
            problems.append(
                f"{shown}:{number}: uses `{name}`, which reaches nth/nth_back on a list or "
                f"tuple iterator ({ADVISORY_NTH}); iterate with next()/get_item() instead, "
                f"or, if the receiver is no Python list or tuple iterator, end the line with "
                f"`// advisories: <why>`"
            )
    return problems


def scan_lockfile(path: Path, shown: str) -> list[str]:
    lock = tomllib.loads(path.read_text(encoding="utf-8"))
    problems = []
    for package in lock.get("package", []):
        name = package["name"]
        depends_on_pyo3 = any(dep.split()[0] == "pyo3" for dep in package.get("dependencies", []))
        if depends_on_pyo3 and not name.startswith("pyo3") and name != "minigun":
            problems.append(
                f"{shown}: crate `{name}` is built on PyO3 and outside this scan; it may call "
                f"nth/nth_back or new_closure ({ADVISORY_NTH}; {ADVISORY_CLOSURE})"
            )
    return problems


def rust_files(root: Path) -> list[Path]:
    return sorted(
        path
        for path in root.rglob("*.rs")
        if not any(
            part in SKIPPED_DIRS or part.startswith(".")
            for part in path.relative_to(root).parts[:-1]
        )
    )


def check(root: Path) -> list[str]:
    problems = []
    for path in rust_files(root):
        problems += scan_rust(path, str(path.relative_to(root)))
    if (root / "Cargo.lock").exists():
        problems += scan_lockfile(root / "Cargo.lock", "Cargo.lock")
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    files = rust_files(root)
    if not files:
        print(f"check_advisories: no Rust file under {root}", file=sys.stderr)
        return 1
    problems = check(root)
    for problem in problems:
        print(problem)
    if problems:
        print(f"check_advisories: {len(problems)} violation(s)", file=sys.stderr)
        return 1
    print(
        f"check_advisories: {len(files)} Rust files clean of {', '.join(NTH_FAMILY)}, "
        f"new_closure; no third-party crate on PyO3"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
