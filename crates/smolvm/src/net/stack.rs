//! The network process of one sandbox: smoltcp on the guest's side, host sockets on the other,
//! the policy in between. One thread runs the event loop ([`Netd::run`]); lookups for the
//! guest's resolver run on short-lived threads and come back through a channel.
//!
//! Each guest TCP connection is seen first as a SYN frame, before smoltcp:
//! - refused by address: answered with a reset at once (the guest sees "connection refused")
//!   and recorded;
//! - allowed by address: the SYN is held while the host-side connection is made, then given to
//!   a smoltcp socket listening on exactly that destination; a failed host connect is a reset,
//!   so the guest sees what a direct connection would have seen;
//! - allowed only by name (`--allow-domain`): accepted in smoltcp, its first bytes read
//!   (TLS SNI or HTTP Host, [`super::sniff`]), checked, and only then connected on the host.
//!
//! UDP is handled below smoltcp, as flows (guest port, destination) mapped to host sockets;
//! datagrams to the resolver are answered here. Host-to-guest forwards accept on 127.0.0.1 and
//! open a smoltcp connection to the guest from the gateway's address.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UdpSocket, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{
    ArpPacket, EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpCidr, IpEndpoint, IpProtocol,
    Ipv4Packet, TcpPacket, UdpPacket,
};

use super::dns::{self, Rcode};
use super::frames::{self, Macs};
use super::policy::{normalize_name, Decider, HostAddrs, Verdict};
use super::refusals::{Refusal, RefusalLog};
use super::sniff::{sniff, Sniffed, MAX_SNIFF};
use super::{ControlReply, ControlRequest, Forward, ReadyLine, DNS, GATEWAY, GUEST, HOST_NAME, WIRE_FD};

const WIRE: Token = Token(0);
const CONTROL: Token = Token(1);
const WAKER: Token = Token(2);
const FIRST_DYNAMIC: usize = 16;

/// smoltcp buffers of one connection, each direction. Allocated lazily by the kernel (zeroed
/// pages), so an idle connection costs little; [`MAX_CONNS`] bounds the worst case.
const TCP_BUF: usize = 256 * 1024;
/// Open TCP connections (both directions) at once; more are refused.
const MAX_CONNS: usize = 256;
const MAX_UDP_FLOWS: usize = 256;
const UDP_IDLE: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);
/// Lookups in flight for the guest; more are answered SERVFAIL.
const MAX_DNS_INFLIGHT: usize = 32;
/// Bytes queued for QEMU before smoltcp is told to wait (back-pressure on the guest's side).
const MAX_WIRE_OUT: usize = 4 << 20;
/// Frames read from QEMU and not yet processed before we stop reading (back-pressure on QEMU).
const MAX_WIRE_IN_FRAMES: usize = 512;
/// A frame on the wire: Ethernet with a 1500-byte payload (no offloads are negotiated).
const MTU: usize = 1514;
const OUR_MAC: EthernetAddress = EthernetAddress([0x52, 0x55, 10, 0, 2, 2]);

/// The guest's end of a connection and its destination, as the guest sees them.
type FlowKey = (SocketAddrV4, SocketAddrV4);

fn unix_now() -> i64 {
    crate::timefmt::now_secs()
}

/// The wire to QEMU as a smoltcp device: frames in, length-prefixed frames out.
struct Wire {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<u8>,
    tx_off: usize,
}

impl Wire {
    fn pending_out(&self) -> usize {
        self.tx.len() - self.tx_off
    }
    fn push_frame(&mut self, frame: &[u8]) {
        self.tx.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.tx.extend_from_slice(frame);
    }
}

struct RxTok(Vec<u8>);
impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct TxTok<'a>(&'a mut Vec<u8>);
impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let start = self.0.len();
        self.0.extend_from_slice(&(len as u32).to_be_bytes());
        self.0.resize(start + 4 + len, 0);
        f(&mut self.0[start + 4..])
    }
}

impl Device for Wire {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _: SInstant) -> Option<(RxTok, TxTok<'_>)> {
        if self.pending_out() >= MAX_WIRE_OUT {
            return None;
        }
        let f = self.rx.pop_front()?;
        Some((RxTok(f), TxTok(&mut self.tx)))
    }

    fn transmit(&mut self, _: SInstant) -> Option<TxTok<'_>> {
        (self.pending_out() < MAX_WIRE_OUT).then_some(TxTok(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = MTU;
        c
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// The host-side connect is in progress; `syn` is the guest's SYN, held until it succeeds
    /// (`None` when the guest's side was accepted already, for a name check).
    Connecting { syn: Option<Vec<u8>> },
    /// Accepted in smoltcp; collecting the first bytes to learn the name.
    Sniffing,
    /// Both sides open: bytes flow.
    Open,
}

struct Conn {
    key: FlowKey,
    token: Token,
    handle: Option<SocketHandle>,
    phase: Phase,
    stream: Option<TcpStream>,
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
}

struct UdpFlow {
    sock: UdpSocket,
    token: Token,
    last: Instant,
}

/// A lookup finished on a worker thread.
struct Lookup {
    query: dns::Query,
    guest: SocketAddrV4,
    addrs: Result<Vec<Ipv4Addr>, String>,
}

struct Netd {
    dir: PathBuf,
    poll: Poll,
    wire: UnixStream,
    wire_in: Vec<u8>,
    wire_readable: bool,
    dev: Wire,
    iface: Interface,
    sockets: SocketSet<'static>,
    guest_mac: Option<EthernetAddress>,
    decider: Decider,
    refusals: RefusalLog,
    conns: HashMap<usize, Conn>,
    by_key: HashMap<FlowKey, usize>,
    by_token: HashMap<Token, usize>,
    /// Listening sockets given a SYN, not yet matched to their connection.
    unassigned: Vec<(SocketHandle, Instant)>,
    /// Sockets to remove after the next poll (so that an abort's reset goes out).
    graveyard: Vec<SocketHandle>,
    udp: HashMap<(u16, SocketAddrV4), UdpFlow>,
    udp_by_token: HashMap<Token, (u16, SocketAddrV4)>,
    listeners: HashMap<Token, (TcpListener, Forward)>,
    control: UnixListener,
    next_token: usize,
    next_port: u16,
    lookups_tx: mpsc::Sender<Lookup>,
    lookups_rx: mpsc::Receiver<Lookup>,
    lookups_inflight: usize,
    waker: Arc<Waker>,
    dns_hosts: Arc<HashMap<String, Vec<Ipv4Addr>>>,
}

/// Runs the network process for the sandbox directory `dir`: reads `net.json`, takes the wire
/// on descriptor [`WIRE_FD`], binds the forwards, prints its [`ReadyLine`] on stdout, then
/// serves until QEMU closes the wire.
pub fn run(dir: &Path) -> io::Result<()> {
    let ready = |line: &ReadyLine| {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{}", serde_json::to_string(line).expect("a ready line serializes"));
        let _ = out.flush();
    };
    let mut netd = match Netd::new(dir) {
        Ok(n) => n,
        Err(e) => {
            ready(&ReadyLine { ssh_port: 0, forwards: vec![], error: Some(e.to_string()) });
            return Err(e);
        }
    };
    let forwards: Vec<Forward> = netd.listeners.values().map(|(_, f)| *f).collect();
    let ssh_port = forwards.iter().find(|f| f.guest == 22).map(|f| f.host).unwrap_or(0);
    ready(&ReadyLine { ssh_port, forwards, error: None });
    crate::child::close_stdout();
    netd.run()
}

fn load_hosts(path: Option<&Path>) -> io::Result<HashMap<String, Vec<Ipv4Addr>>> {
    let mut map: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
    let Some(path) = path else { return Ok(map) };
    let f = std::fs::File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("the resolver's hosts file {}: {e}", path.display())))?;
    for line in io::BufReader::new(f).lines() {
        let line = line?;
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
    fn new(dir: &Path) -> io::Result<Netd> {
        let cfg = super::read_config(dir).map_err(io::Error::other)?;
        // SAFETY: the parent gave us this descriptor (one end of a socket pair) and nothing
        // else in this process owns it.
        let wire_std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(WIRE_FD) };
        wire_std.set_nonblocking(true)?;
        let mut wire = UnixStream::from_std(wire_std);
        let poll = Poll::new()?;
        poll.registry().register(&mut wire, WIRE, Interest::READABLE | Interest::WRITABLE)?;
        let sock_path = super::control_socket(dir);
        let _ = std::fs::remove_file(&sock_path);
        let mut control = UnixListener::bind(&sock_path)?;
        poll.registry().register(&mut control, CONTROL, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);

        let mut dev = Wire { rx: VecDeque::new(), tx: Vec::new(), tx_off: 0 };
        let mut config = Config::new(HardwareAddress::Ethernet(OUR_MAC));
        config.random_seed = rand_seed();
        let mut iface = Interface::new(config, &mut dev, SInstant::now());
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(GATEWAY.into(), 24));
            let _ = a.push(IpCidr::new(DNS.into(), 24));
        });
        iface.routes_mut().add_default_ipv4_route(GATEWAY).map_err(|e| io::Error::other(format!("route: {e}")))?;
        // Accept packets for every destination: each is a connection to judge.
        iface.set_any_ip(true);
        let (lookups_tx, lookups_rx) = mpsc::channel();
        let dns_hosts = Arc::new(load_hosts(cfg.dns_hosts.as_deref())?);
        let mut netd = Netd {
            dir: dir.to_path_buf(),
            poll,
            wire,
            wire_in: Vec::new(),
            wire_readable: true,
            dev,
            iface,
            sockets: SocketSet::new(Vec::new()),
            guest_mac: None,
            decider: Decider::new(cfg.policy.clone(), HostAddrs::default()),
            refusals: RefusalLog::open(dir),
            conns: HashMap::new(),
            by_key: HashMap::new(),
            by_token: HashMap::new(),
            unassigned: Vec::new(),
            graveyard: Vec::new(),
            udp: HashMap::new(),
            udp_by_token: HashMap::new(),
            listeners: HashMap::new(),
            control,
            next_token: FIRST_DYNAMIC,
            next_port: 49152,
            lookups_tx,
            lookups_rx,
            lookups_inflight: 0,
            waker,
            dns_hosts,
        };
        netd.add_forward(cfg.ssh)?;
        for f in &cfg.forwards {
            netd.add_forward(*f)?;
        }
        Ok(netd)
    }

    fn token(&mut self) -> Token {
        self.next_token += 1;
        Token(self.next_token)
    }

    fn add_forward(&mut self, f: Forward) -> io::Result<Forward> {
        if let Some((_, existing)) = self.listeners.values().find(|(_, e)| e.guest == f.guest && f.host == 0) {
            return Ok(*existing);
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, f.host));
        let mut l = TcpListener::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("forward 127.0.0.1:{} -> guest {}: {e}", f.host, f.guest)))?;
        let bound = Forward { host: l.local_addr()?.port(), guest: f.guest };
        let t = self.token();
        self.poll.registry().register(&mut l, t, Interest::READABLE)?;
        self.listeners.insert(t, (l, bound));
        Ok(bound)
    }

    fn refuse(&mut self, proto: &str, dest: String, name: Option<String>, rule: String) {
        self.refusals.record(Refusal { time: unix_now(), proto: proto.into(), dest, name, rule });
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        loop {
            let now = SInstant::now();
            let mut timeout =
                self.iface.poll_delay(now, &self.sockets).map(|d| Duration::from_micros(d.total_micros()));
            // Timers of our own: connects, sniffs, UDP flows, the stats file.
            let tick = Duration::from_millis(if self.refusals.pending() { 200 } else { 1000 });
            timeout = Some(timeout.map_or(tick, |t| t.min(tick)));
            // Frames waiting for smoltcp: go again at once, unless smoltcp is held back by a full
            // queue towards QEMU (a guest that stops reading must not make us spin; QEMU's
            // reading wakes us through the wire's writable event).
            if !self.dev.rx.is_empty() && self.dev.pending_out() < MAX_WIRE_OUT {
                timeout = Some(Duration::ZERO);
            }
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                match ev.token() {
                    WIRE => {
                        if ev.is_readable() || ev.is_read_closed() {
                            self.wire_readable = true;
                        }
                    }
                    CONTROL => self.accept_control(),
                    WAKER => {}
                    t => self.host_event(t, ev.is_readable() || ev.is_read_closed(), ev.is_writable() || ev.is_error()),
                }
            }
            if !self.read_wire()? {
                tracing::debug!("QEMU closed the wire; exiting");
                self.refusals.flush(true);
                let _ = std::fs::remove_file(super::control_socket(&self.dir));
                return Ok(());
            }
            while let Ok(done) = self.lookups_rx.try_recv() {
                self.lookups_inflight -= 1;
                self.answer_lookup(done);
            }
            self.step();
            self.write_wire()?;
            self.expire();
            self.refusals.flush(false);
        }
    }

    /// smoltcp in, our bookkeeping, data both ways, smoltcp out.
    fn step(&mut self) {
        let now = SInstant::now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
        for h in std::mem::take(&mut self.graveyard) {
            self.sockets.remove(h);
        }
        self.assign_listeners();
        let ids: Vec<usize> = self.conns.keys().copied().collect();
        for id in ids {
            self.pump(id);
        }
        self.iface.poll(SInstant::now(), &mut self.dev, &mut self.sockets);
    }

    /// Reads what QEMU sent; `false` once it has closed the wire.
    fn read_wire(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 64 * 1024];
        while self.wire_readable && self.dev.rx.len() < MAX_WIRE_IN_FRAMES {
            match self.wire.read(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.wire_in.extend_from_slice(&buf[..n]);
                    self.take_frames();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wire_readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn take_frames(&mut self) {
        let mut off = 0;
        while self.wire_in.len() - off >= 4 {
            let len = u32::from_be_bytes(self.wire_in[off..off + 4].try_into().expect("4 bytes")) as usize;
            if self.wire_in.len() - off - 4 < len {
                break;
            }
            let frame = self.wire_in[off + 4..off + 4 + len].to_vec();
            off += 4 + len;
            if len <= 65536 {
                self.inspect(frame);
            }
        }
        self.wire_in.drain(..off);
    }

    fn write_wire(&mut self) -> io::Result<()> {
        while self.dev.pending_out() > 0 {
            match self.wire.write(&self.dev.tx[self.dev.tx_off..]) {
                Ok(n) => self.dev.tx_off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => break, // seen as EOF on read
                Err(e) => return Err(e),
            }
        }
        if self.dev.tx_off == self.dev.tx.len() {
            self.dev.tx.clear();
            self.dev.tx_off = 0;
        } else if self.dev.tx_off > self.dev.tx.len() / 2 {
            self.dev.tx.drain(..self.dev.tx_off);
            self.dev.tx_off = 0;
        }
        Ok(())
    }

    fn macs(&self) -> Option<Macs> {
        self.guest_mac.map(|guest| Macs { ours: OUR_MAC, guest })
    }

    /// Looks at a frame from the guest before smoltcp does.
    fn inspect(&mut self, frame: Vec<u8>) {
        let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else { return };
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                // Never answer for the guest's own address (smoltcp's any-IP would).
                if let Ok(arp) = ArpPacket::new_checked(eth.payload()) {
                    if arp.target_protocol_addr() == GUEST.octets() {
                        return;
                    }
                }
                self.guest_mac.get_or_insert(eth.src_addr());
                self.dev.rx.push_back(frame);
            }
            EthernetProtocol::Ipv4 => {
                let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else { return };
                if ip.src_addr() != GUEST || !ip.verify_checksum() {
                    return; // spoofed or corrupt: dropped
                }
                self.guest_mac.get_or_insert(eth.src_addr());
                let (src, dst) = (ip.src_addr(), ip.dst_addr());
                match ip.next_header() {
                    IpProtocol::Udp => {
                        if ip.more_frags() || ip.frag_offset() != 0 {
                            return; // fragmented UDP is not forwarded
                        }
                        let Ok(udp) = UdpPacket::new_checked(ip.payload()) else { return };
                        let from = SocketAddrV4::new(src, udp.src_port());
                        let to = SocketAddrV4::new(dst, udp.dst_port());
                        let payload = udp.payload().to_vec();
                        self.guest_udp(from, to, &payload);
                    }
                    IpProtocol::Tcp => {
                        let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else { return };
                        if tcp.syn() && !tcp.ack() {
                            let key = (SocketAddrV4::new(src, tcp.src_port()), SocketAddrV4::new(dst, tcp.dst_port()));
                            let seq = tcp.seq_number();
                            if !self.guest_syn(key, seq, &frame) {
                                return;
                            }
                        }
                        self.dev.rx.push_back(frame);
                    }
                    IpProtocol::Icmp if dst == GATEWAY || dst == DNS => self.dev.rx.push_back(frame),
                    _ => {}
                }
            }
            _ => {} // IPv6 and the rest: the sandbox network is IPv4
        }
    }

    fn reset(&mut self, key: FlowKey, seq: smoltcp::wire::TcpSeqNumber) {
        if let Some(m) = self.macs() {
            let f = frames::tcp_reset(m, key.1, key.0, seq);
            self.dev.push_frame(&f);
        }
    }

    /// A guest SYN. Returns whether smoltcp should see it now.
    fn guest_syn(&mut self, key: FlowKey, seq: smoltcp::wire::TcpSeqNumber, frame: &[u8]) -> bool {
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

    fn listen_for(&mut self, key: FlowKey) {
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

    fn open_conn(&mut self, key: FlowKey, target: SocketAddr, phase: Phase) {
        let token = self.token();
        let id = token.0;
        let mut c = Conn {
            key,
            token,
            handle: None,
            phase,
            stream: None,
            target,
            to_host: Vec::new(),
            to_host_off: 0,
            host_readable: false,
            host_writable: false,
            host_eof: false,
            shut_wr: false,
            since: Instant::now(),
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

    fn reset_from_syn(&mut self, key: FlowKey, syn: &[u8]) {
        let seq = EthernetFrame::new_checked(syn)
            .ok()
            .and_then(|e| Ipv4Packet::new_checked(e.payload()).ok().map(|i| i.payload().to_vec()))
            .and_then(|p| TcpPacket::new_checked(&p[..]).ok().map(|t| t.seq_number()));
        if let Some(seq) = seq {
            self.reset(key, seq);
        }
    }

    /// Starts the host-side connect of `c`; `false` if it failed at once.
    fn connect_host(&mut self, c: &mut Conn) -> bool {
        match TcpStream::connect(c.target) {
            Ok(mut s) => {
                if self.poll.registry().register(&mut s, c.token, Interest::READABLE | Interest::WRITABLE).is_err() {
                    return false;
                }
                let _ = s.set_nodelay(true);
                c.stream = Some(s);
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
    fn assign_listeners(&mut self) {
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

    fn host_event(&mut self, t: Token, readable: bool, writable: bool) {
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
    fn connect_done(&mut self, id: usize) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        let Some(s) = &c.stream else { return };
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
    fn fail(&mut self, id: usize) {
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
    fn finish(&mut self, id: usize) {
        let Some(c) = self.conns.remove(&id) else { return };
        self.by_key.remove(&c.key);
        self.by_token.remove(&c.token);
        if let Some(h) = c.handle {
            self.graveyard.push(h);
        }
    }

    fn pump(&mut self, id: usize) {
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
        }
    }

    /// The first bytes of a `NeedName` connection are in: check the name they give.
    fn named(&mut self, id: usize, found: Sniffed) {
        let Some(c) = self.conns.get(&id) else { return };
        let ip = IpAddr::V4(*c.key.1.ip());
        let dest = c.key.1.to_string();
        let name = found.name().map(str::to_string);
        match self.decider.check_name(ip, name.as_deref()) {
            Verdict::Allow => {
                let mut c = self.conns.remove(&id).expect("present");
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
                    Sniffed::Tls(_) => "tls",
                    Sniffed::Http(_) => "http",
                    _ => "tcp",
                };
                self.refuse(proto, dest, name, rule);
            }
            Verdict::NeedName => self.fail(id),
        }
    }

    /// A host client connected to a forward: open a connection to the guest.
    fn accept_forward(&mut self, t: Token) {
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
                    stream: Some(stream),
                    target: SocketAddr::V4(remote),
                    to_host: Vec::new(),
                    to_host_off: 0,
                    host_readable: true,
                    host_writable: true,
                    host_eof: false,
                    shut_wr: false,
                    since: Instant::now(),
                },
            );
        }
    }

    /// A datagram from the guest.
    fn guest_udp(&mut self, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
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
    fn host_udp(&mut self, key: (u16, SocketAddrV4)) {
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

    fn guest_dns(&mut self, from: SocketAddrV4, payload: &[u8]) {
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
            let rcode =
                if self.decider.policy.mode == super::NetworkMode::None { Rcode::Refused } else { Rcode::NxDomain };
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

    fn answer_lookup(&mut self, done: Lookup) {
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

    fn expire(&mut self) {
        let idle: Vec<_> = self.udp.iter().filter(|(_, f)| f.last.elapsed() > UDP_IDLE).map(|(k, _)| *k).collect();
        for k in idle {
            if let Some(mut f) = self.udp.remove(&k) {
                let _ = self.poll.registry().deregister(&mut f.sock);
                self.udp_by_token.remove(&f.token);
            }
        }
    }

    fn accept_control(&mut self) {
        loop {
            let (conn, _) = match self.control.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => return tracing::warn!("control socket: {e}"),
            };
            let reply = self.serve_control(conn);
            if let Err(e) = reply {
                tracing::warn!("control request: {e}");
            }
        }
    }

    /// One request, answered at once. The socket is the owner's only (the sandbox directory
    /// is 0700), and a client gets a second to send its line.
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
            Ok(ControlRequest::Reload) => match super::read_config(&self.dir) {
                Ok(cfg) => {
                    tracing::info!("policy now: {}", cfg.policy.summary());
                    self.decider.policy = cfg.policy;
                    ControlReply::default()
                }
                Err(e) => ControlReply { error: Some(e.to_string()), forward: None },
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

/// What to do with a connection after moving its bytes.
enum Action {
    Keep,
    Fail,
    Finish,
    Named(Sniffed),
}

/// Collects the first bytes of a connection until they name a host (or cannot).
fn sniff_step(c: &mut Conn, s: &mut tcp::Socket) -> Action {
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
fn pipe(c: &mut Conn, s: &mut tcp::Socket) -> Action {
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

fn rand_seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into our buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        return std::process::id() as u64 ^ unix_now() as u64;
    }
    u64::from_ne_bytes(b)
}
