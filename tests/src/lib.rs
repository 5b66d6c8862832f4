//! End-to-end tests of blockexportd: see `tests/`.
