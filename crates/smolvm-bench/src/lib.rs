//! Support for the `smolvm-bench` binary, shared with the end-to-end tests: a real HTTP server
//! on 127.0.0.1 that serves a release directory, and summary statistics.

pub mod http;
pub mod stats;
