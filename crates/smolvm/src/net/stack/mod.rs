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

mod conns;
mod control;
mod udp;
mod wire;

use conns::Conn;
use udp::{load_hosts, Lookup, UdpFlow};
use wire::Wire;

struct Netd {
    dir: PathBuf,
    /// The user whose clients the control socket serves.
    owner: u32,
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
    /// Set once the sandbox has secrets: TLS to their hosts is terminated here.
    intercept: Option<Arc<super::intercept::Interceptor>>,
    /// Requests the interceptor threads refused, for the refusal log.
    intercept_refusals: (mpsc::Sender<Refusal>, mpsc::Receiver<Refusal>),
}

/// Runs the network process in the directory `dir` with `cfg`: takes the wire on descriptor
/// [`WIRE_FD`], binds the forwards, prints its [`ReadyLine`] on stdout, then serves until QEMU
/// closes the wire. The control socket serves clients of uid `owner` only.
pub fn run(dir: &Path, cfg: super::NetConfig, owner: u32) -> io::Result<()> {
    let ready = |line: &ReadyLine| {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{}", serde_json::to_string(line).expect("a ready line serializes"));
        let _ = out.flush();
    };
    let mut netd = match Netd::new(dir, cfg, owner) {
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

impl Netd {
    fn new(dir: &Path, cfg: super::NetConfig, owner: u32) -> io::Result<Netd> {
        // SAFETY: the parent gave us this descriptor (one end of a socket pair) and nothing
        // else in this process owns it.
        let wire_std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(WIRE_FD) };
        wire_std.set_nonblocking(true)?;
        let mut wire = UnixStream::from_std(wire_std);
        let poll = Poll::new()?;
        poll.registry().register(&mut wire, WIRE, Interest::READABLE | Interest::WRITABLE)?;
        let sock_path = dir.join(super::CONTROL_SOCKET);
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
            owner,
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
            intercept: None,
            intercept_refusals: mpsc::channel(),
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
                let _ = std::fs::remove_file(self.dir.join(super::CONTROL_SOCKET));
                return Ok(());
            }
            while let Ok(r) = self.intercept_refusals.1.try_recv() {
                self.refusals.record(r);
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
