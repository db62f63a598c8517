//! Console logging. PID 1's stdout and stderr are `/dev/console` (the serial port), which the
//! host saves as the sandbox's `console.log`. Lines are written whole, with one `write(2)`, so
//! that they do not interleave with kernel messages mid-line.

use std::io::Write;

/// Writes one line to the console as a single write.
pub fn console_line(line: &str) {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    let _ = std::io::stdout().lock().write_all(&buf);
}

macro_rules! info {
    ($($arg:tt)*) => { $crate::log::console_line(&format!("smolvm-init: {}", format_args!($($arg)*))) };
}
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::console_line(&format!("smolvm-init: error: {}", format_args!($($arg)*))) };
}
pub(crate) use error;
pub(crate) use info;
