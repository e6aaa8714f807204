"""Mermaid output (API.md section 6) and the command line (section 9)."""

import re
import subprocess
import textwrap

import pytest
from _mg_helpers import PYTHON, subprocess_env

import minigun as mg


def _job_classes():
    class Inner(mg.Task):
        @mg.processor
        def inner_alpha(self, x):
            return x + 1

        @mg.processor
        def inner_beta(self, x):
            return x * 2

    class Job(mg.Task):
        @mg.producer
        def source_stage(self):
            yield from range(3)

        @mg.processor
        def middle_stage(self, x):
            return x

        @mg.consumer
        def sink_stage(self, x):
            pass

    class WithNested(mg.Task):
        @mg.producer
        def source_stage(self):
            yield from range(3)

        nested_part = mg.nested(Inner, name="nested_part")

        @mg.consumer
        def sink_stage(self, x):
            pass

    return Job, WithNested


def _check_flowchart(text, names):
    assert isinstance(text, str)
    assert text.lstrip().startswith("flowchart"), text
    for name in names:
        assert name in text, (name, text)


def test_to_mermaid_on_class_and_instance():
    Job, _ = _job_classes()
    names = ("source_stage", "middle_stage", "sink_stage")
    _check_flowchart(Job.to_mermaid(), names)
    _check_flowchart(Job().to_mermaid(), names)


def test_to_mermaid_draws_nested_pipelines_as_subgraphs():
    _, WithNested = _job_classes()
    text = WithNested.to_mermaid()
    _check_flowchart(text, ("source_stage", "sink_stage", "inner_alpha", "inner_beta"))
    assert "subgraph" in text
    assert "nested_part" in text


def test_to_mermaid_on_a_builder_pipeline_with_nesting():
    inner = mg.Pipeline("inner")
    inner.processor(lambda x: x, name="deep_one")
    outer = mg.Pipeline("outer")
    outer.producer(lambda: [1], name="top_source")
    outer.pipeline(inner, name="inside")
    outer.consumer(lambda x: None, name="top_sink")
    text = outer.to_mermaid()
    _check_flowchart(text, ("top_source", "deep_one", "top_sink"))
    assert "subgraph" in text


def test_to_mermaid_does_not_run_the_pipeline():
    ran = []

    class Job(mg.Task):
        @mg.producer
        def gen(self):
            ran.append(1)
            yield 1

        @mg.consumer
        def sink(self, x):
            ran.append(2)

    Job.to_mermaid()
    assert ran == []


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

_CLI_MODULE = textwrap.dedent(
    """
    import os
    import minigun as mg

    class CliJob(mg.Task):
        @mg.producer
        def cli_numbers(self):
            yield from range(5)

        @mg.processor
        def cli_squared(self, x):
            return x * x

        @mg.consumer
        def cli_record(self, x):
            path = os.environ.get("CLIJOB_OUT")
            if path:
                with open(path, "a") as f:
                    f.write(f"{x}\\n")
    """
)


@pytest.fixture
def cli_module(tmp_path):
    (tmp_path / "clijob_mod.py").write_text(_CLI_MODULE)
    out_file = tmp_path / "out.txt"
    env = subprocess_env(tmp_path)
    env["CLIJOB_OUT"] = str(out_file)
    return tmp_path, env, out_file


def _run_cli(args, env, cwd, timeout=60):
    return subprocess.run(
        [PYTHON, "-m", "minigun", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(cwd),
        timeout=timeout,
    )


@pytest.mark.timeout(90)
def test_cli_dag_prints_mermaid(cli_module):
    tmp_path, env, out_file = cli_module
    proc = _run_cli(["dag", "clijob_mod:CliJob"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    _check_flowchart(proc.stdout, ("cli_numbers", "cli_squared", "cli_record"))
    assert not out_file.exists(), "dag does not run the task"


@pytest.mark.timeout(90)
def test_cli_run_runs_the_task_and_prints_its_summary(cli_module):
    tmp_path, env, out_file = cli_module
    proc = _run_cli(["run", "clijob_mod:CliJob"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("cli_numbers", "cli_squared", "cli_record"):
        assert name in proc.stdout, proc.stdout
    assert sorted(int(v) for v in out_file.read_text().split()) == [0, 1, 4, 9, 16]


@pytest.mark.timeout(120)
def test_cli_demo_exits_zero(tmp_path):
    proc = _run_cli(["demo"], subprocess_env(), tmp_path, timeout=100)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------
# Mermaid structure: unique ids, one edge per route, balanced subgraphs, escaped labels
# ---------------------------------------------------------------------------

_NODE = re.compile(r'^\s*(n\d+)(\(\[|\[)"(.*)"(\]\)|\])$')
_EDGE = re.compile(r"^\s*(n\d+) (-->|-\.->) (n\d+)$")
_SUBGRAPH = re.compile(r'^\s*subgraph (s\d+)\["(.*)"\]$')


def _parse(text):
    lines = text.strip().splitlines()
    assert lines[0] == "flowchart TD"
    nodes, edges, subgraphs, depth = {}, [], [], 0
    for line in lines[1:]:
        if m := _NODE.match(line):
            assert m.group(1) not in nodes, f"duplicate node id {m.group(1)}"
            nodes[m.group(1)] = m.group(3)
        elif m := _EDGE.match(line):
            edges.append((m.group(1), m.group(3)))
        elif m := _SUBGRAPH.match(line):
            subgraphs.append(m.group(2))
            depth += 1
        elif line.strip() == "end":
            depth -= 1
            assert depth >= 0
        else:
            raise AssertionError(f"unparsable Mermaid line: {line!r}")
    assert depth == 0, "unbalanced subgraph/end"
    for a, b in edges:
        assert a in nodes and b in nodes
    return nodes, edges, subgraphs


def test_mermaid_has_one_edge_per_route_and_subgraphs_for_nesting():
    Job, WithNested = _job_classes()
    nodes, edges, subgraphs = _parse(WithNested.to_mermaid())
    label = {v.split("<br/>")[0]: k for k, v in nodes.items()}
    assert set(label) == {"source_stage", "inner_alpha", "inner_beta", "sink_stage"}
    assert sorted(edges) == sorted(
        [
            (label["source_stage"], label["inner_alpha"]),
            (label["inner_alpha"], label["inner_beta"]),
            (label["inner_beta"], label["sink_stage"]),
        ]
    )
    assert subgraphs == ["nested_part"]


def test_mermaid_escapes_names_with_spaces_quotes_and_brackets():
    p = mg.Pipeline("odd names")
    p.producer(lambda: [1], name='say "hi" [now]')
    p.processor(lambda x: x, name="a|b <c> {d}")
    inner = mg.Pipeline("inner")
    inner.consumer(lambda x: None, name="sink & co")
    p.pipeline(inner, name='sub "pipe"')
    nodes, edges, subgraphs = _parse(p.to_mermaid())
    for label in [*nodes.values(), *subgraphs]:
        assert '"' not in label and "[" not in label and "|" not in label, label
    assert len(nodes) == 3 and len(edges) == 2
    assert "say #quot;hi#quot; #91;now#93;" in nodes["n0"]


def test_mermaid_marks_round_robin_edges():
    p = mg.Pipeline("rr")
    p.producer(lambda: [1], name="gen", to=["a", "b"], routing="round_robin")
    p.consumer(lambda x: None, name="a")
    p.consumer(lambda x: None, name="b")
    text = p.to_mermaid()
    assert text.count("-.->") == 2, text
