"""Mermaid output (API.md section 6) and the command line (section 9)."""

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
