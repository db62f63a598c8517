//! A minimal rtnetlink client: link up, add an IPv4 address, add a default route.
//!
//! Three request kinds do not justify a netlink crate; the message layouts are fixed kernel ABI
//! (`linux/netlink.h`, `linux/rtnetlink.h`, `linux/if_addr.h`), written here byte by byte.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

/// An open `NETLINK_ROUTE` socket.
#[derive(Debug)]
pub struct Route {
    fd: OwnedFd,
    seq: u32,
}

/// One request being assembled: header, fixed part, then attributes.
struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, fixed: &[u8]) -> Msg {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in `finish`
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        b.extend_from_slice(fixed);
        Msg(b)
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Msg {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

fn ifindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no network interface named {name}")));
    }
    Ok(idx)
}

impl Route {
    pub fn open() -> io::Result<Route> {
        // SAFETY: plain socket(2) call with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Route { fd, seq: 0 })
    }

    /// Sets `IFF_UP` on the interface.
    pub fn link_up(&mut self, dev: &str) -> io::Result<()> {
        let idx = ifindex(dev)?;
        let mut ifi = [0u8; 16]; // ifinfomsg: family, pad, type, index, flags, change
        ifi[4..8].copy_from_slice(&(idx as i32).to_ne_bytes());
        ifi[8..12].copy_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        ifi[12..16].copy_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        self.seq += 1;
        self.request(Msg::new(RTM_NEWLINK, 0, self.seq, &ifi).finish())
    }

    /// Adds `addr/prefix_len` to the interface.
    pub fn add_ipv4_address(&mut self, dev: &str, addr: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
        let idx = ifindex(dev)?;
        let mut ifa = [0u8; 8]; // ifaddrmsg: family, prefixlen, flags, scope, index
        ifa[0] = libc::AF_INET as u8;
        ifa[1] = prefix_len;
        ifa[4..8].copy_from_slice(&idx.to_ne_bytes());
        self.seq += 1;
        let msg = Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, self.seq, &ifa)
            .attr(IFA_LOCAL, &addr.octets())
            .attr(IFA_ADDRESS, &addr.octets())
            .finish();
        self.request(msg)
    }

    /// Adds `default via gw dev dev`.
    pub fn add_ipv4_default_route(&mut self, dev: &str, gw: Ipv4Addr) -> io::Result<()> {
        let idx = ifindex(dev)?;
        // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags(u32)
        let rtm =
            [libc::AF_INET as u8, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0, 0, 0, 0];
        self.seq += 1;
        let msg = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, self.seq, &rtm)
            .attr(RTA_GATEWAY, &gw.octets())
            .attr(RTA_OIF, &idx.to_ne_bytes())
            .finish();
        self.request(msg)
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, msg: Vec<u8>) -> io::Result<()> {
        // SAFETY: `msg` is a valid buffer of `msg.len()` bytes; the fd is an open socket.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is writable for its full length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(result) = parse_ack(&buf[..n as usize], self.seq) {
                return result;
            }
        }
    }
}

/// Finds the `NLMSG_ERROR` acknowledging `seq`: errno 0 is success.
fn parse_ack(mut buf: &[u8], seq: u32) -> Option<io::Result<()>> {
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().ok()?);
        let msg_seq = u32::from_ne_bytes(buf[8..12].try_into().ok()?);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Some(Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink reply")));
        }
        if kind == NLMSG_ERROR && msg_seq == seq && len >= NLMSG_HDRLEN + 4 {
            let errno = i32::from_ne_bytes(buf[16..20].try_into().ok()?);
            return Some(if errno == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-errno)) });
        }
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_layout_matches_the_kernel_abi() {
        let m = Msg::new(RTM_NEWADDR, NLM_F_CREATE, 7, &[2, 24, 0, 0, 3, 0, 0, 0])
            .attr(IFA_LOCAL, &[10, 0, 2, 15])
            .finish();
        assert_eq!(m.len(), 16 + 8 + 8);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), RTM_NEWADDR);
        assert_eq!(u16::from_ne_bytes(m[6..8].try_into().unwrap()), NLM_F_CREATE | NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(&m[24..28], &[8, 0, 2, 0][..]); // rta_len 8, rta_type IFA_LOCAL (little endian)
        assert_eq!(&m[28..32], &[10, 0, 2, 15][..]);
    }

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        let m = Msg::new(1, 0, 1, &[]).attr(9, &[1]).finish();
        assert_eq!(m.len(), 16 + 8);
    }

    #[test]
    fn ack_parsing() {
        let mut ack = vec![0u8; 36];
        ack[0..4].copy_from_slice(&36u32.to_ne_bytes());
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack[8..12].copy_from_slice(&5u32.to_ne_bytes());
        assert!(matches!(parse_ack(&ack, 5), Some(Ok(()))));
        assert!(parse_ack(&ack, 6).is_none());
        ack[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        let err = parse_ack(&ack, 5).unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    }
}
