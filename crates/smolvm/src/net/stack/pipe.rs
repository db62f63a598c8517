//! A held connection's bytes: the first ones sniffed for the name they carry, then both ways
//! between the guest's socket and the host's, each later plain-HTTP request checked.

use super::*;

/// What to do with a connection after moving its bytes.
pub(super) enum Action {
    Keep,
    Fail,
    Finish,
    Named(Sniffed),
    /// A later request of a checked connection is refused: why.
    Refuse(String),
}

/// Collects the first bytes of a connection until they name a host (or cannot).
pub(super) fn sniff_step(c: &mut Conn, s: &mut tcp::Socket) -> Action {
    while s.can_recv() && c.to_host.len() < MAX_SNIFF {
        let mut buf = [0u8; 4096];
        let room = (MAX_SNIFF - c.to_host.len()).min(buf.len());
        match s.recv_slice(&mut buf[..room]) {
            Ok(n) if n > 0 => c.to_host.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let found = sniff(&c.to_host);
    let established = !matches!(s.state(), tcp::State::Listen | tcp::State::SynReceived);
    let gave_up = (established && !s.may_recv()) || c.since.elapsed() > SNIFF_TIMEOUT;
    if found != Sniffed::NeedMore || gave_up {
        return Action::Named(found);
    }
    if !s.is_open() {
        return Action::Finish;
    }
    Action::Keep
}

/// Moves bytes both ways between the guest's socket and the host's.
pub(super) fn pipe(c: &mut Conn, s: &mut tcp::Socket) -> Action {
    let Some(stream) = c.stream.as_mut() else { return Action::Fail };
    // Guest -> host.
    loop {
        if c.to_host_off == c.to_host.len() {
            c.to_host.clear();
            c.to_host_off = 0;
            if !s.can_recv() {
                break;
            }
            c.to_host.resize(64 * 1024, 0);
            match s.recv_slice(&mut c.to_host) {
                Ok(n) => c.to_host.truncate(n),
                Err(_) => c.to_host.clear(),
            }
            if c.to_host.is_empty() {
                break;
            }
            if let Some(h) = c.http.as_mut() {
                let raw = std::mem::take(&mut c.to_host);
                if let Err(r) = h.0.feed(&raw, &mut c.to_host) {
                    return Action::Refuse(r.reason);
                }
                if c.to_host.is_empty() {
                    continue;
                }
            }
        }
        if !c.host_writable {
            break;
        }
        match stream.write(&c.to_host[c.to_host_off..]) {
            Ok(n) => c.to_host_off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.host_writable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Action::Fail,
        }
    }
    let flushed = c.to_host_off == c.to_host.len();
    let established = !matches!(s.state(), tcp::State::SynSent | tcp::State::SynReceived | tcp::State::Listen);
    if established && !s.may_recv() && s.recv_queue() == 0 && flushed && !c.shut_wr {
        let _ = stream.shutdown(std::net::Shutdown::Write);
        c.shut_wr = true;
    }
    // Host -> guest.
    while c.host_readable && !c.host_eof && s.may_send() {
        let room = s.send_capacity() - s.send_queue();
        if room == 0 {
            break;
        }
        let mut buf = [0u8; 64 * 1024];
        let want = room.min(buf.len());
        match stream.read(&mut buf[..want]) {
            Ok(0) => {
                c.host_eof = true;
                s.close();
            }
            Ok(n) => {
                let _ = s.send_slice(&buf[..n]);
                if let Some(h) = c.http.as_mut() {
                    let (gate, framer) = &mut **h;
                    match framer.feed(&buf[..n], &mut Vec::new(), &mut gate.sent) {
                        Ok(ev) => {
                            if let Some(switched) = ev.upgrade_answered {
                                // The guest's bytes that waited for the answer go now (checked
                                // as requests unless it switched protocols).
                                let mut more = Vec::new();
                                if let Err(r) = gate.upgrade_answered(switched, &mut more) {
                                    return Action::Refuse(r.reason);
                                }
                                c.to_host.extend_from_slice(&more);
                            }
                        }
                        // A response we cannot frame: stop checking (nothing more can be
                        // told apart on this connection), and stop the connection.
                        Err(r) => return Action::Refuse(r.reason),
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.host_readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Action::Fail,
        }
    }
    match s.state() {
        tcp::State::Closed | tcp::State::TimeWait if flushed || !c.host_writable => Action::Finish,
        tcp::State::Closed if c.since.elapsed() > CONNECT_TIMEOUT => Action::Finish,
        _ => Action::Keep,
    }
}
