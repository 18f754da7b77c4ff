//! The solver proper: runs the op graph the frontend produced.

pub mod runner;
