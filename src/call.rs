//! Calling a user function with one argument through vectorcall: no argument tuple is made
//! per call.
//!
//! PyO3 builds a tuple for every call under the limited API (the abi3 wheel), since
//! `PyObject_Vectorcall` entered the stable ABI only in CPython 3.12. CPython 3.11 exports
//! it as a function all the same (PyO3's own bindings say so for non-limited 3.11 builds),
//! so it is declared here once for every interpreter the extension supports: 3.11, 3.12
//! and later, and free-threaded 3.13t.

use std::ptr;

use pyo3::ffi;
use pyo3::prelude::*;

extern "C" {
    fn PyObject_Vectorcall(
        callable: *mut ffi::PyObject,
        args: *const *mut ffi::PyObject,
        nargsf: usize,
        kwnames: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
}

/// `PY_VECTORCALL_ARGUMENTS_OFFSET`: the slot before the arguments is scratch space the
/// callee may borrow (a bound method puts its `self` there instead of copying the args).
const ARGUMENTS_OFFSET: usize = 1 << (usize::BITS - 1);

/// `callable(arg)`.
pub fn call_one<'py>(
    callable: &Bound<'py, PyAny>,
    arg: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let slots = [ptr::null_mut(), arg.as_ptr()];
    // SAFETY: both objects are alive and the GIL (or on 3.13t, an attached thread state)
    // is held for the lifetime 'py; `slots[1..]` is the one borrowed argument and
    // `slots[0]` the scratch slot ARGUMENTS_OFFSET allows the callee to use; the result is
    // a new reference or NULL with an exception set.
    unsafe {
        let result = PyObject_Vectorcall(
            callable.as_ptr(),
            slots.as_ptr().add(1),
            1 | ARGUMENTS_OFFSET,
            ptr::null_mut(),
        );
        Bound::from_owned_ptr_or_err(callable.py(), result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyo3::types::PyDict;

    #[test]
    fn calls_functions_methods_and_callable_objects_with_one_argument() {
        Python::initialize();
        Python::attach(|py| {
            let scope = PyDict::new(py);
            py.run(
                c"def double(x): return x * 2\n\
                  class Adder:\n    def __init__(self): self.total = 0\n    \
                  def add(self, x): self.total += x; return self.total\n    \
                  def __call__(self, x): return self.add(x)\n\
                  adder = Adder()\n\
                  def fails(x): raise ValueError(x)\n",
                None,
                Some(&scope),
            )
            .unwrap();
            let get = |name: &str| scope.get_item(name).unwrap().unwrap();
            let arg = 21i64.into_pyobject(py).unwrap().into_any();
            let doubled: i64 = call_one(&get("double"), &arg).unwrap().extract().unwrap();
            assert_eq!(doubled, 42);
            let adder = get("adder");
            call_one(&adder.getattr("add").unwrap(), &arg).unwrap();
            let total: i64 = call_one(&adder, &arg).unwrap().extract().unwrap();
            assert_eq!(total, 42);
            let builtin: i64 = call_one(
                &py.eval(c"abs", None, None).unwrap(),
                &(-5i64).into_pyobject(py).unwrap().into_any(),
            )
            .unwrap()
            .extract()
            .unwrap();
            assert_eq!(builtin, 5);
            let error = call_one(&get("fails"), &arg).unwrap_err();
            assert!(error.is_instance_of::<pyo3::exceptions::PyValueError>(py));
        });
    }
}
