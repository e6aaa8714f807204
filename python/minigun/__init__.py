"""minigun: composable, high-throughput data pipelines with a Rust runtime.

import minigun as mg

class Double(mg.Task):
    @mg.producer
    def numbers(self):
        yield from range(1000)

    @mg.processor(threads=4)
    def double(self, n):
        return n * 2

    @mg.consumer
    def show(self, n):
        print(n)

print(Double().run().summary())
"""

from __future__ import annotations

from .context import emit, trigger
from .dsl import Task, accumulator, consumer, nested, processor, producer
from .errors import (
    DefinitionError,
    MinigunError,
    PipelineError,
    RoutingError,
    UnsupportedStrategy,
    WorkerError,
)
from .hooks import (
    after,
    after_fork,
    after_run,
    after_worker,
    before,
    before_fork,
    before_run,
    before_worker,
    on_error,
)
from .pipeline import Pipeline
from .run import Run
from .stage import Stage
from .stats import RunResult, StageStats

__version__ = "0.1.0"

__all__ = [
    "DefinitionError",
    "MinigunError",
    "Pipeline",
    "PipelineError",
    "RoutingError",
    "Run",
    "RunResult",
    "Stage",
    "StageStats",
    "Task",
    "UnsupportedStrategy",
    "WorkerError",
    "accumulator",
    "after",
    "after_fork",
    "after_run",
    "after_worker",
    "before",
    "before_fork",
    "before_run",
    "before_worker",
    "consumer",
    "emit",
    "nested",
    "on_error",
    "processor",
    "producer",
    "trigger",
]
