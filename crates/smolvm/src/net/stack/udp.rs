//! UDP: flows from the guest mapped to host sockets, and the guest's resolver.

use super::*;

pub(super) struct UdpFlow {
    sock: UdpSocket,
    token: Token,
    last: Instant,
}

/// A lookup finished on a worker thread.
pub(super) struct Lookup {
    query: dns::Query,
    guest: SocketAddrV4,
    addrs: Result<Vec<Ipv4Addr>, String>,
}

pub(super) fn load_hosts(text: Option<&str>) -> io::Result<HashMap<String, Vec<Ipv4Addr>>> {
    let mut map: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
    let Some(text) = text else { return Ok(map) };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(addr) = words.next() else { continue };
        let Ok(addr) = addr.parse::<Ipv4Addr>() else { continue };
        for name in words {
            map.entry(normalize_name(name)).or_default().push(addr);
        }
    }
    Ok(map)
}

impl Netd {
    /// A datagram from the guest.
    pub(super) fn guest_udp(&mut self, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
        if *to.ip() == DNS && to.port() == 53 {
            return self.guest_dns(from, payload);
        }
        let key = (from.port(), to);
        if let Some(flow) = self.udp.get_mut(&key) {
            flow.last = Instant::now();
            let _ = flow.sock.send(payload);
            return;
        }
        let verdict = if *to.ip() == GATEWAY || *to.ip() == DNS {
            Verdict::Refuse("the host (UDP)".into())
        } else {
            self.decider.check_ip(IpAddr::V4(*to.ip()), false)
        };
        if let Verdict::Refuse(rule) = verdict {
            return self.refuse("udp", to.to_string(), None, rule);
        }
        if self.udp.len() >= MAX_UDP_FLOWS {
            return self.refuse("udp", to.to_string(), None, format!("more than {MAX_UDP_FLOWS} UDP flows"));
        }
        let sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).and_then(|s| {
            s.connect(to)?;
            s.set_nonblocking(true)?;
            Ok(s)
        });
        let mut sock = match sock {
            Ok(s) => UdpSocket::from_std(s),
            Err(e) => return tracing::debug!("UDP to {to}: {e}"),
        };
        let token = self.token();
        if self.poll.registry().register(&mut sock, token, Interest::READABLE).is_err() {
            return;
        }
        let _ = sock.send(payload);
        self.udp_by_token.insert(token, key);
        self.udp.insert(key, UdpFlow { sock, token, last: Instant::now() });
    }

    /// Datagrams from the host side of a flow, to the guest.
    pub(super) fn host_udp(&mut self, key: (u16, SocketAddrV4)) {
        let Some(macs) = self.macs() else { return };
        let Some(flow) = self.udp.get_mut(&key) else { return };
        let mut buf = [0u8; 65536];
        loop {
            match flow.sock.recv(&mut buf) {
                Ok(n) => {
                    flow.last = Instant::now();
                    if n + 28 > MTU - 14 {
                        continue; // would need fragmenting; dropped like an oversized datagram
                    }
                    let f = frames::udp(macs, key.1, SocketAddrV4::new(GUEST, key.0), &buf[..n]);
                    self.dev.push_frame(&f);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => break, // ICMP errors from the far end: the guest will time out
            }
        }
    }

    pub(super) fn guest_dns(&mut self, from: SocketAddrV4, payload: &[u8]) {
        let Some(q) = dns::parse_query(payload) else { return };
        let reply = |s: &mut Netd, rcode: Rcode, addrs: &[Ipv4Addr]| {
            if let Some(m) = s.macs() {
                let f = frames::udp(m, SocketAddrV4::new(DNS, 53), from, &dns::response(&q, rcode, addrs));
                s.dev.push_frame(&f);
            }
        };
        if q.qclass != 1 {
            return reply(self, Rcode::NotImp, &[]);
        }
        if let Verdict::Refuse(rule) = self.decider.check_query(&q.name) {
            self.refuse("dns", q.name.clone(), Some(q.name.clone()), rule);
            let rcode = if self.decider.policy.mode == crate::net::NetworkMode::None {
                Rcode::Refused
            } else {
                Rcode::NxDomain
            };
            return reply(self, rcode, &[]);
        }
        if q.name == HOST_NAME {
            return reply(self, Rcode::NoError, &[GATEWAY]);
        }
        match q.qtype {
            dns::TYPE_A => {}
            dns::TYPE_AAAA => return reply(self, Rcode::NoError, &[]),
            _ => return reply(self, Rcode::NotImp, &[]),
        }
        if self.lookups_inflight >= MAX_DNS_INFLIGHT {
            return reply(self, Rcode::ServFail, &[]);
        }
        self.lookups_inflight += 1;
        let (tx, waker, hosts) = (self.lookups_tx.clone(), self.waker.clone(), self.dns_hosts.clone());
        std::thread::spawn(move || {
            let addrs = match hosts.get(&q.name) {
                Some(a) => Ok(a.clone()),
                None => resolve(&q.name),
            };
            let _ = tx.send(Lookup { query: q, guest: from, addrs });
            let _ = waker.wake();
        });
    }

    pub(super) fn answer_lookup(&mut self, done: Lookup) {
        let q = &done.query;
        let (rcode, addrs) = match done.addrs {
            Err(e) => {
                tracing::debug!("resolve {}: {e}", q.name);
                (Rcode::NxDomain, vec![])
            }
            Ok(all) => {
                let ips: Vec<IpAddr> = all.iter().map(|a| IpAddr::V4(*a)).collect();
                let (kept, refused) = self.decider.check_resolved(&q.name, &ips);
                for (ip, rule) in refused {
                    self.refuse("dns", ip.to_string(), Some(q.name.clone()), format!("resolves to {rule}"));
                }
                let kept: Vec<Ipv4Addr> =
                    kept.into_iter().filter_map(|ip| if let IpAddr::V4(v4) = ip { Some(v4) } else { None }).collect();
                if kept.is_empty() && !all.is_empty() {
                    (Rcode::NxDomain, kept)
                } else {
                    (Rcode::NoError, kept)
                }
            }
        };
        if let Some(m) = self.macs() {
            let f = frames::udp(m, SocketAddrV4::new(DNS, 53), done.guest, &dns::response(q, rcode, &addrs));
            self.dev.push_frame(&f);
        }
    }

    pub(super) fn expire(&mut self) {
        let idle: Vec<_> = self.udp.iter().filter(|(_, f)| f.last.elapsed() > UDP_IDLE).map(|(k, _)| *k).collect();
        for k in idle {
            if let Some(mut f) = self.udp.remove(&k) {
                let _ = self.poll.registry().deregister(&mut f.sock);
                self.udp_by_token.remove(&f.token);
            }
        }
    }
}

/// The host resolver's IPv4 addresses for `name`.
fn resolve(name: &str) -> Result<Vec<Ipv4Addr>, String> {
    use std::net::ToSocketAddrs;
    let addrs = (name, 0u16).to_socket_addrs().map_err(|e| e.to_string())?;
    let mut v4: Vec<Ipv4Addr> = addrs
        .filter_map(|a| match a {
            SocketAddr::V4(a) => Some(*a.ip()),
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped(),
        })
        .collect();
    v4.dedup();
    Ok(v4)
}
