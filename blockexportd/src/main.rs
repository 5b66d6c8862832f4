//! The blockexportd binary (work in progress).

fn main() {}
