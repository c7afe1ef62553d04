//! `thb`: the admin tool (placeholder, see the `cli` feature).
fn main() {}
