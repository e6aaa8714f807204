//! The typed boundary with the Python layer: one stage as `minigun.run` describes it (the
//! `StageSpec` TypedDict of `minigun/native.py`, field for field).
//!
//! Every field is read by name, so a missing or ill-typed one is a `DefinitionError`
//! that names the stage and the field, not a bare `TypeError` from deep in a conversion.

use std::collections::HashMap;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::pyclass::{PyTraverseError, PyVisit};
use pyo3::types::PyDict;

use crate::emit::{Item, Routing};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Producer,
    Processor,
    Accumulator,
}

/// How a stage's call is made: per item, emitting the return value unless None
/// (`Value`) or each element of it (`Iterate`); or per chunk (`Chunk`): the call takes a
/// list of items, emits through `emit()` itself, retries by itself and returns
/// `(retries, [(item, exception), ...])` for the items that failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CallMode {
    Value,
    Iterate,
    Chunk,
}

/// A closed set of names, read from a Python `str`.
trait Named: Sized + Copy + 'static {
    const NAMES: &'static [(&'static str, Self)];
}

impl Named for Kind {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("producer", Kind::Producer),
        ("processor", Kind::Processor),
        ("accumulator", Kind::Accumulator),
    ];
}

impl Named for CallMode {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("value", CallMode::Value),
        ("iterate", CallMode::Iterate),
        ("chunk", CallMode::Chunk),
    ];
}

impl Named for Routing {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("broadcast", Routing::Broadcast),
        ("round_robin", Routing::RoundRobin),
    ];
}

fn named<T: Named>(obj: &Bound<'_, PyAny>) -> PyResult<T> {
    let text: String = obj.extract()?;
    T::NAMES
        .iter()
        .find(|(name, _)| *name == text)
        .map(|&(_, value)| value)
        .ok_or_else(|| {
            let expected: Vec<_> = T::NAMES
                .iter()
                .map(|(name, _)| format!("{name:?}"))
                .collect();
            PyTypeError::new_err(format!("{text:?} is not one of {}", expected.join(", ")))
        })
}

/// One stage of a run.
pub struct StageSpec {
    pub name: String,
    pub kind: Kind,
    /// The function called per item (per batch for accumulators; once for producers).
    pub call: Option<Item>,
    pub mode: CallMode,
    /// Builds one worker's `(call, close)`: a custom Stage's copy after its `open()`.
    pub make_worker: Option<Item>,
    pub workers: usize,
    /// A new thread per input item (`spawn_thread`), at most `workers` at once.
    pub spawn_per_item: bool,
    /// The `inline` strategy: runs on its sender's thread where it can (`inline.rs`).
    pub inline: bool,
    pub queue_size: Option<usize>,
    /// Items a chunk for this stage should carry at least, when there are that many.
    pub min_chunk: usize,
    /// Stage indices this stage sends to, one per edge.
    pub downstream: Vec<usize>,
    pub routing: Routing,
    pub route_names: HashMap<String, Vec<usize>>,
    pub route_error: Item,
    pub retries: u32,
    pub retry_on: Item,
    pub retry_backoff: f64,
    /// `on_failure(error, item, stage) -> bool`: True when an `on_error` handler took it.
    pub on_failure: Item,
    /// Called once when the stage has finished (the `after("stage")` hooks).
    pub on_finish: Option<Item>,
    pub auto_start: bool,
    pub max_size: usize,
    pub max_all: usize,
    pub check_interval: usize,
    pub max_wait: Option<f64>,
    pub key: Option<Item>,
}

/// The fields of one spec dict, each read with errors that name the stage and the field.
struct Fields<'a, 'py> {
    dict: &'a Bound<'py, PyDict>,
    stage: String,
}

impl<'py> Fields<'_, 'py> {
    fn any(&self, field: &str) -> PyResult<Bound<'py, PyAny>> {
        self.dict
            .get_item(field)?
            .ok_or_else(|| self.error(field, PyTypeError::new_err("the field is missing")))
    }

    fn get<T: for<'a> FromPyObject<'a, 'py>>(&self, field: &str) -> PyResult<T> {
        let value = self.any(field)?;
        value
            .extract::<T>()
            .map_err(|err| self.error(field, err.into()))
    }

    fn name<T: Named>(&self, field: &str) -> PyResult<T> {
        named(&self.any(field)?).map_err(|err| self.error(field, err))
    }

    fn error(&self, field: &str, cause: PyErr) -> PyErr {
        let py = self.dict.py();
        let message = format!(
            "stage {:?}: invalid {field}: {}",
            self.stage,
            cause.value(py)
        );
        definition_error(py, message).unwrap_or_else(|err| err)
    }
}

/// A `minigun.errors.DefinitionError` carrying `message`.
fn definition_error(py: Python<'_>, message: String) -> PyResult<PyErr> {
    let class = py.import("minigun.errors")?.getattr("DefinitionError")?;
    Ok(PyErr::from_value(class.call1((message,))?))
}

impl StageSpec {
    /// How many long-lived threads run the stage (and take its input): a processor's
    /// workers, else one (a `spawn_thread` stage's one thread hands items out).
    pub fn thread_count(&self) -> usize {
        match self.kind {
            Kind::Processor if !self.spawn_per_item => self.workers.max(1),
            _ => 1,
        }
    }

    /// Read one stage's spec from the dict the Python layer built.
    pub fn from_dict(dict: &Bound<'_, PyDict>) -> PyResult<Self> {
        let stage = match dict.get_item("name")? {
            Some(name) => name.str()?.to_string(),
            None => "?".to_owned(),
        };
        let f = Fields { dict, stage };
        Ok(StageSpec {
            name: f.get("name")?,
            kind: f.name("kind")?,
            call: f.get("call")?,
            mode: f.name("mode")?,
            make_worker: f.get("make_worker")?,
            workers: f.get("workers")?,
            spawn_per_item: f.get("spawn_per_item")?,
            inline: f.get("inline")?,
            queue_size: f.get("queue_size")?,
            min_chunk: f.get("min_chunk")?,
            downstream: f.get("downstream")?,
            routing: f.name("routing")?,
            route_names: f.get("route_names")?,
            route_error: f.get("route_error")?,
            retries: f.get("retries")?,
            retry_on: f.get("retry_on")?,
            retry_backoff: f.get("retry_backoff")?,
            on_failure: f.get("on_failure")?,
            on_finish: f.get("on_finish")?,
            auto_start: f.get("auto_start")?,
            max_size: f.get("max_size")?,
            max_all: f.get("max_all")?,
            check_interval: f.get("check_interval")?,
            max_wait: f.get("max_wait")?,
            key: f.get("key")?,
        })
    }

    /// Show the garbage collector the Python objects this spec holds.
    pub fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.call)?;
        visit.call(&self.make_worker)?;
        visit.call(&self.route_error)?;
        visit.call(&self.retry_on)?;
        visit.call(&self.on_failure)?;
        visit.call(&self.on_finish)?;
        visit.call(&self.key)
    }
}
