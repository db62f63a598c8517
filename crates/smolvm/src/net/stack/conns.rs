//! TCP: each guest connection judged at its SYN, then held, sniffed or piped; forwards from
//! the host to the guest.

use super::*;
use crate::net::intercept::request::RequestGate;
use crate::net::intercept::response::ResponseScrub;

#[path = "pipe.rs"]
mod pipe;
use pipe::{pipe, sniff_step, Action};

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// The host-side connect is in progress; `syn` is the guest's SYN, held until it succeeds
    /// (`None` when the guest's side was accepted already, for a name check).
    Connecting { syn: Option<Vec<u8>> },
    /// Accepted in smoltcp; collecting the first bytes to learn the name.
    Sniffing,
    /// Both sides open: bytes flow.
    Open,
}

/// The host side of a connection: a socket to where the guest connects, or (intercepted, for
/// a secret's host) the interceptor thread's end of a socket pair.
pub(super) enum HostStream {
    Tcp(TcpStream),
    Intercepted(UnixStream),
}

impl HostStream {
    fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        match self {
            HostStream::Tcp(s) => s.shutdown(how),
            HostStream::Intercepted(s) => s.shutdown(how),
        }
    }
}

impl Read for HostStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.read(buf),
            HostStream::Intercepted(s) => s.read(buf),
        }
    }
}

impl Write for HostStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.write(buf),
            HostStream::Intercepted(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(super) struct Conn {
    key: FlowKey,
    token: Token,
    handle: Option<SocketHandle>,
    phase: Phase,
    stream: Option<HostStream>,
    /// Allowed by its address already, and sniffed only to see whether a secret's host is
    /// named (TLS to port 443 of a sandbox with secrets).
    ip_allowed: bool,
    /// Where the host side connects (the destination, or 127.0.0.1:port for a host port).
    target: SocketAddr,
    /// Guest bytes not yet written to the host (also the sniffed prefix).
    to_host: Vec<u8>,
    to_host_off: usize,
    host_readable: bool,
    host_writable: bool,
    host_eof: bool,
    shut_wr: bool,
    since: Instant,
    /// A plain-HTTP connection allowed by its name under a domain allow-list: every later
    /// request on it is checked too (the same Host, unambiguous framing), and responses are
    /// framed to see an upgrade's answer.
    http: Option<Box<(RequestGate, ResponseScrub)>>,
}

impl Netd {
    pub(super) fn reset(&mut self, key: FlowKey, seq: smoltcp::wire::TcpSeqNumber) {
        if let Some(m) = self.macs() {
            let f = frames::tcp_reset(m, key.1, key.0, seq);
            self.dev.push_frame(&f);
        }
    }

    /// A guest SYN. Returns whether smoltcp should see it now.
    pub(super) fn guest_syn(&mut self, key: FlowKey, seq: smoltcp::wire::TcpSeqNumber, frame: &[u8]) -> bool {
        if let Some(id) = self.by_key.get(&key) {
            // A retransmission: held while connecting, else smoltcp's socket has it.
            return !matches!(self.conns[id].phase, Phase::Connecting { syn: Some(_) });
        }
        let (dst_ip, dst_port) = (*key.1.ip(), key.1.port());
        let dest = key.1.to_string();
        let (verdict, target) = if dst_ip == GATEWAY {
            if self.decider.policy.allow_host_ports.contains(&dst_port) {
                (Verdict::Allow, SocketAddr::from((Ipv4Addr::LOCALHOST, dst_port)))
            } else {
                (Verdict::Refuse("the host (not an --allow-host-port)".into()), key.1.into())
            }
        } else if dst_ip == DNS {
            (Verdict::Refuse("the resolver answers UDP only".into()), key.1.into())
        } else {
            (self.decider.check_ip(IpAddr::V4(dst_ip), true), key.1.into())
        };
        if self.conns.len() >= MAX_CONNS {
            self.refuse("tcp", dest, None, format!("more than {MAX_CONNS} connections open"));
            self.reset(key, seq);
            return false;
        }
        match verdict {
            Verdict::Refuse(rule) => {
                self.refuse("tcp", dest, None, rule);
                self.reset(key, seq);
                false
            }
            Verdict::Allow if dst_port == 443 && dst_ip != GATEWAY && self.intercept.is_some() => {
                // It may name a secret's host: accepted and sniffed (the address is allowed).
                self.listen_for(key);
                self.open_conn(key, target, Phase::Sniffing);
                if let Some(id) = self.by_key.get(&key) {
                    if let Some(c) = self.conns.get_mut(id) {
                        c.ip_allowed = true;
                    }
                }
                true
            }
            Verdict::Allow => {
                self.open_conn(key, target, Phase::Connecting { syn: Some(frame.to_vec()) });
                false
            }
            Verdict::NeedName => {
                self.listen_for(key);
                self.open_conn(key, target, Phase::Sniffing);
                true
            }
        }
    }

    pub(super) fn listen_for(&mut self, key: FlowKey) {
        let mut s =
            tcp::Socket::new(tcp::SocketBuffer::new(vec![0; TCP_BUF]), tcp::SocketBuffer::new(vec![0; TCP_BUF]));
        s.set_nagle_enabled(false);
        let ep = IpEndpoint::new((*key.1.ip()).into(), key.1.port());
        if let Err(e) = s.listen(ep) {
            tracing::warn!("listen on {ep}: {e}");
            return;
        }
        let h = self.sockets.add(s);
        self.unassigned.push((h, Instant::now()));
    }

    pub(super) fn open_conn(&mut self, key: FlowKey, target: SocketAddr, phase: Phase) {
        let token = self.token();
        let id = token.0;
        let mut c = Conn {
            key,
            token,
            handle: None,
            phase,
            stream: None,
            ip_allowed: false,
            target,
            to_host: Vec::new(),
            to_host_off: 0,
            host_readable: false,
            host_writable: false,
            host_eof: false,
            shut_wr: false,
            since: Instant::now(),
            http: None,
        };
        if matches!(c.phase, Phase::Connecting { .. }) && !self.connect_host(&mut c) {
            if let Phase::Connecting { syn: Some(syn) } = &c.phase {
                self.reset_from_syn(key, syn);
            }
            return;
        }
        self.by_key.insert(key, id);
        self.by_token.insert(token, id);
        self.conns.insert(id, c);
    }

    pub(super) fn reset_from_syn(&mut self, key: FlowKey, syn: &[u8]) {
        let seq = EthernetFrame::new_checked(syn)
            .ok()
            .and_then(|e| Ipv4Packet::new_checked(e.payload()).ok().map(|i| i.payload().to_vec()))
            .and_then(|p| TcpPacket::new_checked(&p[..]).ok().map(|t| t.seq_number()));
        if let Some(seq) = seq {
            self.reset(key, seq);
        }
    }

    /// Starts the host-side connect of `c`; `false` if it failed at once.
    pub(super) fn connect_host(&mut self, c: &mut Conn) -> bool {
        match TcpStream::connect(c.target) {
            Ok(mut s) => {
                if self.poll.registry().register(&mut s, c.token, Interest::READABLE | Interest::WRITABLE).is_err() {
                    return false;
                }
                let _ = s.set_nodelay(true);
                c.stream = Some(HostStream::Tcp(s));
                c.since = Instant::now();
                true
            }
            Err(e) => {
                tracing::debug!("connect {}: {e}", c.target);
                false
            }
        }
    }

    /// Matches listening sockets that took a SYN to their connections.
    pub(super) fn assign_listeners(&mut self) {
        let mut still = Vec::new();
        for (h, at) in std::mem::take(&mut self.unassigned) {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if s.state() == tcp::State::Listen {
                if at.elapsed() < SNIFF_TIMEOUT {
                    still.push((h, at));
                } else {
                    self.sockets.remove(h);
                }
                continue;
            }
            let key = match (s.remote_endpoint(), s.local_endpoint()) {
                (Some(r), Some(l)) => match (r.addr, l.addr) {
                    (smoltcp::wire::IpAddress::Ipv4(ra), smoltcp::wire::IpAddress::Ipv4(la)) => {
                        Some((SocketAddrV4::new(ra, r.port), SocketAddrV4::new(la, l.port)))
                    }
                },
                _ => None,
            };
            match key.and_then(|k| self.by_key.get(&k).copied()) {
                Some(id) if self.conns[&id].handle.is_none() => {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.handle = Some(h);
                    }
                }
                _ => {
                    s.abort();
                    self.graveyard.push(h);
                }
            }
        }
        self.unassigned = still;
    }

    pub(super) fn host_event(&mut self, t: Token, readable: bool, writable: bool) {
        if let Some(&id) = self.by_token.get(&t) {
            let Some(c) = self.conns.get_mut(&id) else { return };
            c.host_readable |= readable;
            c.host_writable |= writable;
            if let Phase::Connecting { .. } = c.phase {
                if writable {
                    self.connect_done(id);
                }
            }
        } else if let Some(key) = self.udp_by_token.get(&t).copied() {
            self.host_udp(key);
        } else if self.listeners.contains_key(&t) {
            self.accept_forward(t);
        }
    }

    /// A host-side connect finished (or failed).
    pub(super) fn connect_done(&mut self, id: usize) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        let Some(HostStream::Tcp(s)) = &c.stream else { return };
        let result = match s.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match s.peer_addr() {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return, // not yet
                Err(e) => Err(e),
            },
        };
        let key = c.key;
        match result {
            Ok(()) => {
                let syn = match std::mem::replace(&mut c.phase, Phase::Open) {
                    Phase::Connecting { syn } => syn,
                    _ => None,
                };
                if let Some(syn) = syn {
                    self.listen_for(key);
                    self.dev.rx.push_front(syn);
                }
            }
            Err(e) => {
                tracing::debug!("connect {}: {e}", c.target);
                self.fail(id);
            }
        }
    }

    /// Ends a connection with a reset to the guest.
    pub(super) fn fail(&mut self, id: usize) {
        let Some(c) = self.conns.remove(&id) else { return };
        self.by_key.remove(&c.key);
        self.by_token.remove(&c.token);
        if let Phase::Connecting { syn: Some(syn) } = &c.phase {
            self.reset_from_syn(c.key, syn);
        }
        if let Some(h) = c.handle {
            self.sockets.get_mut::<tcp::Socket>(h).abort();
            self.graveyard.push(h);
        }
    }

    /// Ends a connection whose both sides are done.
    pub(super) fn finish(&mut self, id: usize) {
        let Some(c) = self.conns.remove(&id) else { return };
        self.by_key.remove(&c.key);
        self.by_token.remove(&c.token);
        if let Some(h) = c.handle {
            self.graveyard.push(h);
        }
    }

    pub(super) fn pump(&mut self, id: usize) {
        let action = {
            let Some(c) = self.conns.get_mut(&id) else { return };
            match c.handle {
                None => {
                    let limit =
                        if matches!(c.phase, Phase::Connecting { .. }) { CONNECT_TIMEOUT } else { SNIFF_TIMEOUT };
                    if c.since.elapsed() > limit {
                        Action::Fail
                    } else {
                        Action::Keep
                    }
                }
                Some(h) => {
                    let s = self.sockets.get_mut::<tcp::Socket>(h);
                    match c.phase {
                        Phase::Connecting { .. } if c.since.elapsed() > CONNECT_TIMEOUT || !s.is_open() => Action::Fail,
                        Phase::Connecting { .. } => Action::Keep,
                        Phase::Sniffing => sniff_step(c, s),
                        Phase::Open => pipe(c, s),
                    }
                }
            }
        };
        match action {
            Action::Keep => {}
            Action::Fail => self.fail(id),
            Action::Finish => self.finish(id),
            Action::Named(found) => self.named(id, found),
            Action::Refuse(rule) => {
                let (dest, name) = match self.conns.get(&id) {
                    Some(c) => (c.key.1.to_string(), c.http.as_ref().map(|h| h.0.host().to_string())),
                    None => (String::new(), None),
                };
                self.fail(id);
                self.refuse("http", dest, name, rule);
            }
        }
    }

    /// The first bytes of a `NeedName` connection are in: check the name they give.
    pub(super) fn named(&mut self, id: usize, found: Sniffed) {
        let Some(c) = self.conns.get(&id) else { return };
        let ip = IpAddr::V4(*c.key.1.ip());
        let dest = c.key.1.to_string();
        let name = found.name().map(str::to_string);
        let verdict = match &found {
            _ if c.ip_allowed => Verdict::Allow,
            Sniffed::Ech(_) => {
                Verdict::Refuse("an encrypted ClientHello (ECH) hides the server name --allow-domain checks".into())
            }
            _ => self.decider.check_name(ip, name.as_deref()),
        };
        match verdict {
            Verdict::Allow => {
                let to_intercept = match (&found, &self.intercept) {
                    (Sniffed::Tls(sni), Some(i)) if i.intercepts(sni) => Some((i.clone(), sni.clone())),
                    _ => None,
                };
                if let Some((icpt, sni)) = to_intercept {
                    return self.intercept_conn(id, icpt, sni);
                }
                let mut c = self.conns.remove(&id).expect("present");
                if let (Sniffed::Http(host), false) = (&found, c.ip_allowed) {
                    // Allowed for this Host: so must every later request on it be.
                    let mut gate = RequestGate::checking(host, c.key.1.port());
                    let mut first = Vec::new();
                    if let Err(r) = gate.feed(&c.to_host, &mut first) {
                        self.conns.insert(id, c);
                        self.fail(id);
                        return self.refuse("http", dest, name, r.reason);
                    }
                    c.to_host = first;
                    c.to_host_off = 0;
                    c.http = Some(Box::new((gate, ResponseScrub::new(Vec::new()))));
                }
                c.phase = Phase::Connecting { syn: None };
                let ok = self.connect_host(&mut c);
                self.conns.insert(id, c);
                if !ok {
                    self.fail(id);
                }
            }
            Verdict::Refuse(rule) => {
                self.fail(id);
                let proto = match found {
                    Sniffed::Tls(_) | Sniffed::Ech(_) => "tls",
                    Sniffed::Http(_) => "http",
                    _ => "tcp",
                };
                self.refuse(proto, dest, name, rule);
            }
            Verdict::NeedName => self.fail(id),
        }
    }

    /// Hands connection `id` (TLS to a secret's host `sni`) to the interceptor: its host side
    /// becomes one end of a socket pair, the interceptor thread holds the other.
    fn intercept_conn(&mut self, id: usize, icpt: Arc<super::super::intercept::Interceptor>, sni: String) {
        let Some(mut c) = self.conns.remove(&id) else { return };
        let pair = std::os::unix::net::UnixStream::pair().and_then(|(a, b)| {
            a.set_nonblocking(true)?;
            Ok((UnixStream::from_std(a), b))
        });
        let (mut ours, theirs) = match pair {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("intercept {sni}: {e}");
                self.conns.insert(id, c);
                return self.fail(id);
            }
        };
        if self.poll.registry().register(&mut ours, c.token, Interest::READABLE | Interest::WRITABLE).is_err() {
            self.conns.insert(id, c);
            return self.fail(id);
        }
        icpt.spawn(theirs, SocketAddr::V4(c.key.1), sni);
        c.stream = Some(HostStream::Intercepted(ours));
        c.phase = Phase::Open;
        c.since = Instant::now();
        self.conns.insert(id, c);
    }

    /// A host client connected to a forward: open a connection to the guest.
    pub(super) fn accept_forward(&mut self, t: Token) {
        loop {
            let Some((l, f)) = self.listeners.get(&t) else { return };
            let guest_port = f.guest;
            let (mut stream, _) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("accept on forward to {guest_port}: {e}");
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNS {
                continue;
            }
            self.next_port = if self.next_port >= 65000 { 49152 } else { self.next_port + 1 };
            let local = SocketAddrV4::new(GATEWAY, self.next_port);
            let remote = SocketAddrV4::new(GUEST, guest_port);
            let mut s =
                tcp::Socket::new(tcp::SocketBuffer::new(vec![0; TCP_BUF]), tcp::SocketBuffer::new(vec![0; TCP_BUF]));
            s.set_nagle_enabled(false);
            let cx = self.iface.context();
            if let Err(e) =
                s.connect(cx, IpEndpoint::new(GUEST.into(), guest_port), IpEndpoint::new(GATEWAY.into(), local.port()))
            {
                tracing::warn!("connect to the guest's port {guest_port}: {e}");
                continue;
            }
            let h = self.sockets.add(s);
            let token = self.token();
            if self.poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE).is_err() {
                self.sockets.remove(h);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let id = token.0;
            let key = (remote, local);
            self.by_key.insert(key, id);
            self.by_token.insert(token, id);
            self.conns.insert(
                id,
                Conn {
                    key,
                    token,
                    handle: Some(h),
                    phase: Phase::Open,
                    stream: Some(HostStream::Tcp(stream)),
                    ip_allowed: false,
                    target: SocketAddr::V4(remote),
                    to_host: Vec::new(),
                    to_host_off: 0,
                    host_readable: true,
                    host_writable: true,
                    host_eof: false,
                    shut_wr: false,
                    since: Instant::now(),
                    http: None,
                },
            );
        }
    }
}
