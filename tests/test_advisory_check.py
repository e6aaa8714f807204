"""The advisory check (scripts/check_advisories.py) passes on this tree and catches each way
the Rust code could reach RUSTSEC-2026-0176 or RUSTSEC-2026-0177."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "scripts" / "check_advisories.py"


def run_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHECK), str(root)], capture_output=True, text=True, timeout=60
    )


def plant(tmp_path: Path, rust: str, name: str = "src/planted.rs") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(rust))
    return tmp_path


def test_this_tree_is_clean():
    result = run_check(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "rust, advisory",
    [
        ("let f = PyCFunction::new_closure(py, None, None, body)?;", "RUSTSEC-2026-0177"),
        ("use pyo3::types::PyCFunction::new_closure as make;", "RUSTSEC-2026-0177"),
        ("let third = list.iter().nth(2);", "RUSTSEC-2026-0176"),
        ("let x = tuple.iter().nth_back(0);", "RUSTSEC-2026-0176"),
        ("for item in args.iter().skip(1) {}", "RUSTSEC-2026-0176"),
        ("let evens: Vec<_> = list.iter().step_by(2).collect();", "RUSTSEC-2026-0176"),
        ("let x = list.iter().enumerate().nth(3);", "RUSTSEC-2026-0176"),
        ("let x = list.iter().rev().skip(1).next();", "RUSTSEC-2026-0176"),
        ("let x = Iterator::nth(&mut items, 3);", "RUSTSEC-2026-0176"),
        ("let pick = items.map(Iterator::nth);", "RUSTSEC-2026-0176"),
        ("let x = list\n    .iter()\n    .skip(1)\n    .count();", "RUSTSEC-2026-0176"),
        ("let x = list.iter(). nth (1);", "RUSTSEC-2026-0176"),
        # A range that is not the receiver does not exempt the call.
        ("let x = list.get_slice(0, 9).iter().skip((0..2).len());", "RUSTSEC-2026-0176"),
        # A plain comment is no exemption: the marker must say `advisories:`.
        ("let x = list.iter().skip(1); // fine, trust me", "RUSTSEC-2026-0176"),
    ],
)
def test_planted_violation_fails_the_check(tmp_path, rust, advisory):
    result = run_check(plant(tmp_path, f"fn planted() {{\n    {rust}\n}}\n"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "src/planted.rs:" in result.stdout
    assert advisory in result.stdout


def test_violation_is_reported_with_its_line(tmp_path):
    rust = """\
        // nth and skip in a comment are prose
        fn planted(list: &Bound<'_, PyList>) {
            let fine = list.iter().last();
            let bad = list.iter().nth(1);
        }
        """
    result = run_check(plant(tmp_path, rust))
    assert result.returncode == 1
    assert result.stdout.startswith("src/planted.rs:4: uses `nth`")
    assert len(result.stdout.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "rust",
    [
        "// a comment may say nth, skip, step_by, new_closure",
        "/* a block /* nested */ comment: list.iter().nth(2) */",
        'let s = "iter().skip(1) and new_closure";',
        'let s = r#"raw: .nth(3) "quoted" "#;',
        "for start in (0..1000).step_by(3) {}",
        "for i in (1..=n).skip(1) {}",
        "let skipped = 1; let nth_item = 2; let step_byte = 3;",
        "let first = list.iter().next(); let n = list.iter().count(); let l = list.iter().last();",
        "let rest = args[1..].iter().skip(1); // advisories: a Rust slice, not a Python list",
        "let c = 'n'; fn f<'a>(x: &'a str) -> &'a str { x }",
    ],
)
def test_allowed_code_passes(tmp_path, rust):
    result = run_check(plant(tmp_path, f"fn planted() {{\n    {rust}\n}}\n"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rust_file_is_scanned(tmp_path):
    plant(tmp_path, "fn fine() {}\n", "src/lib.rs")
    plant(tmp_path, "fn bad(t: &Bound<'_, PyTuple>) { t.iter().nth(1); }\n", "tests/it.rs")
    result = run_check(tmp_path)
    assert result.returncode == 1
    assert "tests/it.rs:1:" in result.stdout


def test_a_crate_built_on_pyo3_fails_the_check(tmp_path):
    plant(tmp_path, "fn fine() {}\n", "src/lib.rs")
    (tmp_path / "Cargo.lock").write_text(
        textwrap.dedent(
            """\
            version = 4

            [[package]]
            name = "minigun"
            version = "0.1.0"
            dependencies = ["numpy", "pyo3"]

            [[package]]
            name = "numpy"
            version = "0.28.0"
            dependencies = ["pyo3 0.28.3", "ndarray"]

            [[package]]
            name = "pyo3-macros"
            version = "0.28.3"
            dependencies = ["pyo3-macros-backend"]
            """
        )
    )
    result = run_check(tmp_path)
    assert result.returncode == 1
    assert "crate `numpy` is built on PyO3" in result.stdout
    assert "pyo3-macros" not in result.stdout


def test_a_tree_without_rust_fails_rather_than_passing_vacuously(tmp_path):
    result = run_check(tmp_path)
    assert result.returncode == 1
    assert "no Rust file" in result.stderr
