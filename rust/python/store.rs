//! Bindings of the host store and CPU AdamW (filled in by the host-store work).

use pyo3::prelude::*;

pub(crate) fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
