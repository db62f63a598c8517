//! The control socket: reload the policy, add a forward; one request per connection.

use super::*;

impl Netd {
    pub(super) fn accept_control(&mut self) {
        loop {
            let (conn, _) = match self.control.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => return tracing::warn!("control socket: {e}"),
            };
            if !crate::child::peer_is(&conn, self.owner) {
                tracing::warn!("control socket: refused a client of another user");
                continue;
            }
            let reply = self.serve_control(conn);
            if let Err(e) = reply {
                tracing::warn!("control request: {e}");
            }
        }
    }

    /// One request, answered at once. The socket is the owner's only (the sandbox directory
    /// is 0700, the peer's uid is checked), and a client gets a second to send its line.
    /// Where interceptor threads report refused requests: queued for this loop, which is
    /// woken to record them.
    fn refusal_sink(&self) -> crate::net::intercept::RefusalSink {
        let tx = self.intercept_refusals.0.clone();
        let waker = self.waker.clone();
        Arc::new(move |r| {
            let _ = tx.send(r);
            let _ = waker.wake();
        })
    }

    fn serve_control(&mut self, conn: UnixStream) -> io::Result<()> {
        // SAFETY: we take the descriptor out of mio's wrapper, which gives up ownership.
        let std_conn = unsafe {
            use std::os::fd::IntoRawFd;
            std::os::unix::net::UnixStream::from_raw_fd(conn.into_raw_fd())
        };
        std_conn.set_nonblocking(false)?;
        std_conn.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut line = String::new();
        io::BufReader::new((&std_conn).take(64 * 1024)).read_line(&mut line)?;
        let reply = match serde_json::from_str::<ControlRequest>(&line) {
            Err(e) => ControlReply { error: Some(format!("bad request: {e}")), forward: None },
            Ok(ControlRequest::Reload { policy }) => match policy.validate() {
                Ok(()) => {
                    tracing::info!("policy now: {}", policy.summary());
                    self.decider.policy = policy;
                    ControlReply::default()
                }
                Err(e) => ControlReply { error: Some(e.to_string()), forward: None },
            },
            Ok(ControlRequest::Intercept { config }) => match &self.intercept {
                Some(i) => {
                    i.set_rules(&config.rules);
                    ControlReply::default()
                }
                None => match crate::net::intercept::Interceptor::new(&config, self.refusal_sink()) {
                    Ok(i) => {
                        tracing::info!(
                            "secrets for {} host(s)",
                            config.rules.iter().map(|r| r.hosts.len()).sum::<usize>()
                        );
                        self.intercept = Some(Arc::new(i));
                        ControlReply::default()
                    }
                    Err(e) => ControlReply { error: Some(e.to_string()), forward: None },
                },
            },
            Ok(ControlRequest::Forward { forward }) => match self.add_forward(forward) {
                Ok(f) => ControlReply { error: None, forward: Some(f) },
                Err(e) => ControlReply { error: Some(e.to_string()), forward: None },
            },
        };
        let mut out = serde_json::to_string(&reply).map_err(io::Error::other)?;
        out.push('\n');
        (&std_conn).write_all(out.as_bytes())
    }
}
