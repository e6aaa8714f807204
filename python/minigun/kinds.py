"""The kinds of stage (API.md section 1), in a module of their own so that the lowest layers
(stats, errors) can name them without importing the stage classes."""

PRODUCER = "producer"
PROCESSOR = "processor"
ACCUMULATOR = "accumulator"
PIPELINE = "pipeline"
