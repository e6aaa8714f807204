"""Stage options: a typo or a bad value is a DefinitionError naming the stage and option."""

from __future__ import annotations

import pytest

import minigun as mg


def test_unknown_option_names_the_stage_and_the_nearest_option():
    with pytest.raises(mg.DefinitionError, match=r"'work'.*thread=.*did you mean threads="):

        class Job(mg.Task):
            @mg.producer
            def numbers(self):
                yield 1

            @mg.processor(thread=4)
            def work(self, n):
                return n


@pytest.mark.parametrize(
    "typo, nearest",
    [
        ("queue_sise", "queue_size"),
        ("retires", "retries"),
        ("stratgy", "strategy"),
        ("max_szie", "max_size"),
    ],
)
def test_builder_typos_suggest_the_nearest_option(typo, nearest):
    p = mg.Pipeline("p")
    with pytest.raises(mg.DefinitionError, match=rf"'w'.*{typo}=.*did you mean {nearest}="):
        p.processor(lambda x: x, name="w", **{typo: 1})


def test_an_option_like_nothing_lists_the_valid_ones():
    with pytest.raises(mg.DefinitionError, match=r"unknown option colour=; \(stage options: "):
        mg.Pipeline("p").consumer(print, colour="red")


def test_nested_pipeline_rejects_unknown_options():
    inner = mg.Pipeline("inner")
    inner.processor(lambda x: x, name="w")
    with pytest.raises(mg.DefinitionError, match=r"'inner'.*thread="):
        mg.Pipeline("outer").pipeline(inner, thread=2)


def test_accumulator_error_names_the_decorated_method():
    with pytest.raises(mg.DefinitionError, match=r"accumulator 'acc' runs as one worker"):

        class Job(mg.Task):
            @mg.producer
            def numbers(self):
                yield 1

            @mg.accumulator(max_size=10, threads=4)
            def acc(self, batch):
                return batch


def test_bodiless_accumulator_error_names_the_attribute():
    with pytest.raises(mg.DefinitionError, match=r"accumulator 'batch': max_size"):

        class Job(mg.Task):
            @mg.producer
            def numbers(self):
                yield 1

            batch = mg.accumulator(max_size=0)


@pytest.mark.parametrize(
    "option, value",
    [
        ("queue_size", 2**64),
        ("queue_size", 0),
        ("queue_size", 1.5),
        ("retries", -1),
        ("retries", 2**70),
        ("retry_backoff", "soon"),
        ("retry_backoff", -1),
        ("threads", 2**64),
    ],
)
def test_bad_option_values_are_definition_errors(option, value):
    p = mg.Pipeline("p")
    with pytest.raises(mg.DefinitionError, match=rf"stage 'work': {option}="):
        p.processor(lambda x: x, name="work", **{option: value})


def test_total_is_a_producer_option():
    p = mg.Pipeline("p")
    with pytest.raises(mg.DefinitionError, match=r"processor 'w': total= is a producer option"):
        p.processor(lambda x: x, name="w", total=3)
    with pytest.raises(mg.DefinitionError, match=r"producer 'src': total="):
        p.producer(lambda: [], name="src", total=-1)


def test_custom_stage_option_typo_names_the_stage_and_the_nearest_option():
    class Upper(mg.Stage):
        def process(self, item):
            return item.upper()

    with pytest.raises(mg.DefinitionError, match=r"stage 'upper'.*thread=.*did you mean threads="):
        Upper("upper", thread=4)
    assert Upper("upper", threads=2).threads == 2
