//! Support for the `smolvm-bench` binary: summary statistics. (The HTTP server it shares with
//! the tests is in `smolvm-testkit`.)

pub mod stats;
