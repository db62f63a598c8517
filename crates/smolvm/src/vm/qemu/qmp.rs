//! A minimal QMP (QEMU Machine Protocol) client: one JSON object per line over a unix socket.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// A QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to the QMP socket of the QEMU of pid `qemu` (checked before a byte is sent),
    /// reads the greeting and negotiates capabilities.
    pub fn connect(socket: &Path, qemu: i32) -> io::Result<Qmp> {
        let stream = crate::child::connect_served_by(socket, qemu, "QEMU")?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer };
        qmp.read_message()?; // {"QMP": {...}}
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "QMP connection closed"));
        }
        serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Runs a command and returns its `return` value (events in between are skipped).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> io::Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        loop {
            let v = self.read_message()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(io::Error::other(format!("QMP {command}: {e}")));
            }
        }
    }

    /// A human-monitor command (e.g. `hostfwd_add`); returns its text output.
    pub fn hmp(&mut self, command_line: &str) -> io::Result<String> {
        let r = self.execute("human-monitor-command", Some(json!({ "command-line": command_line })))?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }
}
