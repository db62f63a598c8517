//! Test support shared by the integration tests of every crate and by `smolvm-bench`: real
//! servers, nothing mocked.

pub mod http;
